"""Frontend and worker as separate processes, started the way `make run` and the chart start them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import pytest

from mistral_serve.client import ChatClient
from mistral_serve.frontend.health import READINESS_SERVICE
from tests.conftest import free_port
from tests.support.health import wait_serving
from tests.support.requests import chat, events_text


@pytest.fixture
def processes(redis_url: str, subprocess_env: dict[str, str]) -> Iterator[int]:
    port = free_port()
    env = {
        **subprocess_env,
        "MISTRAL_SERVE_REDIS_URL": redis_url,
        "MISTRAL_SERVE_GRPC_PORT": str(port),
        "MISTRAL_SERVE_GRPC_HOST": "127.0.0.1",
        "MISTRAL_SERVE_HEALTH_HOST": "127.0.0.1",
        "MISTRAL_SERVE_HEALTH_PORT": str(free_port()),
        "MISTRAL_SERVE_ENGINE": "tests.support.scripted_engine:from_env",
        "MISTRAL_SERVE_LOG_FORMAT": "json",
        "MISTRAL_SERVE_HTTP_PORT": "off",
    }
    started = [
        subprocess.Popen([sys.executable, "-m", f"mistral_serve.{name}"], env=env)
        for name in ("frontend", "worker")
    ]
    yield port
    for process in started:
        process.terminate()
    for process in started:
        assert process.wait(timeout=30) == 0, "a process did not drain cleanly on SIGTERM"


async def test_chat_streams_across_processes(processes: int) -> None:
    target = f"127.0.0.1:{processes}"
    await wait_serving(processes, READINESS_SERVICE)
    async with ChatClient(target) as client:
        results = await asyncio.gather(*(_text(client, f"proc {i}") for i in range(8)))
    assert results == [f"proc {i} w1 w2 w3 w4 w5 w6 w7 w8 w9 w10" for i in range(8)]


async def _text(client: ChatClient, prompt: str) -> str:
    events = [e async for e in client.stream(chat(prompt))]
    assert events[-1].WhichOneof("event") == "finished"
    return events_text(events)
