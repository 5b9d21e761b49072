"""Frontend and worker as separate processes, started the way `make run` and the chart start them."""

from __future__ import annotations

import asyncio
import signal

from mistral_serve.client import ChatClient
from tests.conftest import Processes
from tests.support.requests import chat, events_text


async def test_chat_streams_across_processes(processes: Processes) -> None:
    frontend = await processes.start("frontend")
    worker = await processes.start("worker")
    for child in (frontend, worker):
        await processes.launcher.ready(child)
    # Every port, metrics included, was bound by the process itself (port 0) and reported.
    assert {"grpc", "metrics"} <= frontend.ports.keys() and {"health", "metrics"} <= worker.ports.keys()
    async with ChatClient(f"127.0.0.1:{frontend.ports['grpc']}") as client:
        results = await asyncio.gather(*(_text(client, f"proc {i}") for i in range(8)))
    assert results == [f"proc {i} w1 w2 w3 w4 w5 w6 w7 w8 w9 w10" for i in range(8)]

    for child in (worker, frontend):
        child.process.send_signal(signal.SIGTERM)
    for child in (worker, frontend):
        code = await asyncio.to_thread(child.process.wait, 30)
        assert code == 0, f"{child.name} did not drain cleanly on SIGTERM"


async def _text(client: ChatClient, prompt: str) -> str:
    events = [e async for e in client.stream(chat(prompt))]
    assert events[-1].WhichOneof("event") == "finished"
    return events_text(events)
