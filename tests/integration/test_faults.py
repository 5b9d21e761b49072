"""Faults with real processes and a real redis-server: lost workers, drains, Redis restarts."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest

from mistral_serve.client import ChatClient
from mistral_serve.frontend.health import READINESS_SERVICE
from mistral_serve.v1 import chat_pb2
from mistral_serve.worker.health import READINESS_SERVICE as WORKER_READY
from tests.conftest import Processes, start_redis
from tests.support.health import NO_ANSWER, wait_for_status, wait_serving
from tests.support.requests import chat, events_text
from tests.support.waiting import until

SLOW = {"SCRIPTED_TOKENS_PER_S": "50", "SCRIPTED_TOKENS": "120", "lease_ms": "900"}


def request(i: int) -> chat_pb2.ChatRequest:
    r = chat(f"stream number {i}")
    r.sampling.temperature = 0.0
    return r


class Recorder:
    """Collects one stream's events and checks its shape as they come."""

    def __init__(self) -> None:
        self.events: list[chat_pb2.ChatEvent] = []
        self.deltas = 0

    async def run(self, client: ChatClient, req: chat_pb2.ChatRequest, timeout_s: float = 60) -> Recorder:
        async for event in client.stream(req, timeout_s=timeout_s):
            self.events.append(event)
            if event.WhichOneof("event") == "delta":
                self.deltas += 1
                assert event.delta.sequence == self.deltas, "a gap or a duplicate"
        return self

    @property
    def text(self) -> str:
        return events_text(self.events)

    @property
    def terminal(self) -> str | None:
        return self.events[-1].WhichOneof("event") if self.events else None


async def test_kill_9_of_a_worker_mid_stream_loses_nothing(processes: Processes) -> None:
    slow = {**SLOW, "SCRIPTED_TOKENS_PER_S": "60", "SCRIPTED_TOKENS": "300"}
    _, port = await processes.spawn("frontend")
    worker_a, a_health = await processes.spawn("worker", **slow)
    await wait_serving(port, READINESS_SERVICE)
    await wait_serving(a_health, WORKER_READY)
    async with ChatClient(f"127.0.0.1:{port}") as client:
        undisturbed = [
            r.text for r in await asyncio.gather(*(Recorder().run(client, request(i)) for i in range(32)))
        ]

        recorders = [Recorder() for _ in range(32)]
        streams = [asyncio.create_task(r.run(client, request(i))) for i, r in enumerate(recorders)]
        _, b_health = await processes.spawn("worker", **slow)  # idle until A is lost: A holds every job
        await wait_serving(b_health, WORKER_READY)
        await until(lambda: all(r.deltas >= 5 for r in recorders))
        worker_a.send_signal(signal.SIGKILL)
        interrupted = [r.terminal not in ("finished", "error") for r in recorders]
        await asyncio.gather(*streams)

    assert all(interrupted), "every stream must be cut in the middle by the kill"
    assert all(r.terminal == "finished" for r in recorders)
    assert [r.text for r in recorders] == undisturbed
    assert all(len(r.text.split()) == 300 for r in recorders)
    # Resumed runs started on B after A's lease lapsed: their queue time spans the lease.
    assert all(r.events[-1].finished.timings.queue_seconds >= 0.9 for r in recorders)


async def test_worker_sigterm_hands_unfinished_jobs_to_another_worker(processes: Processes) -> None:
    _, port = await processes.spawn("frontend")
    worker_a, a_health = await processes.spawn("worker", drain_grace_s="0.3", **SLOW)
    await wait_serving(port, READINESS_SERVICE)
    await wait_serving(a_health, WORKER_READY)
    async with ChatClient(f"127.0.0.1:{port}") as client:
        recorders = [Recorder() for _ in range(8)]
        streams = [asyncio.create_task(r.run(client, request(i))) for i, r in enumerate(recorders)]
        _, b_health = await processes.spawn("worker", **SLOW)
        await wait_serving(b_health, WORKER_READY)
        await until(lambda: all(r.deltas >= 3 for r in recorders))
        worker_a.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker_a.wait, 30) == 0
        await asyncio.gather(*streams)

    assert all(r.terminal == "finished" for r in recorders)
    assert [r.text for r in recorders] == [
        " ".join((f"stream number {i}".split() + [f"w{k}" for k in range(1, 118)])[:120]) for i in range(8)
    ]


async def test_frontend_sigterm_finishes_open_streams_and_refuses_new_ones(processes: Processes) -> None:
    frontend, port = await processes.spawn("frontend", drain_grace_s="20")
    _, health = await processes.spawn("worker", SCRIPTED_TOKENS_PER_S="40", SCRIPTED_TOKENS="40")
    await wait_serving(port, READINESS_SERVICE)
    await wait_serving(health, WORKER_READY)
    async with ChatClient(f"127.0.0.1:{port}", max_attempts=1) as client:
        recorders = [Recorder() for _ in range(4)]
        streams = [asyncio.create_task(r.run(client, request(i))) for i, r in enumerate(recorders)]
        await until(lambda: all(r.deltas >= 2 for r in recorders))
        frontend.send_signal(signal.SIGTERM)
        await wait_for_status(port, "", NO_ANSWER)  # the draining server takes no new RPC
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.chat(request(99), timeout_s=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.gather(*streams)
    assert all(r.terminal == "finished" and r.deltas == 40 for r in recorders)
    assert await asyncio.to_thread(frontend.wait, 30) == 0


async def test_redis_restart_mid_run_ends_streams_by_their_deadline_and_recovers(
    processes: Processes, tmp_path: Path
) -> None:
    redis_server = start_redis(tmp_path)
    processes.redis_url = redis_server.url
    try:
        _, port = await processes.spawn("frontend")
        _, health = await processes.spawn("worker", SCRIPTED_TOKENS_PER_S="20", SCRIPTED_TOKENS="60")
        await wait_serving(port, READINESS_SERVICE)
        await wait_serving(health, WORKER_READY)
        async with ChatClient(f"127.0.0.1:{port}", max_attempts=1) as client:
            recorders = [Recorder() for _ in range(4)]
            streams = [
                asyncio.create_task(r.run(client, request(i), timeout_s=8)) for i, r in enumerate(recorders)
            ]
            await until(lambda: all(r.deltas >= 2 for r in recorders))
            redis_server.stop()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.chat(request(50), timeout_s=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            redis_server = start_redis(tmp_path, port=redis_server.port)  # back, and empty

            results = await asyncio.gather(*streams, return_exceptions=True)
            for result in results:
                # Each stream completed (its worker kept it in memory) or ended by its deadline: none hangs.
                if isinstance(result, grpc.aio.AioRpcError):
                    assert result.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                else:
                    assert isinstance(result, Recorder) and result.terminal in ("finished", "error")

            await wait_serving(port, READINESS_SERVICE)
            await wait_serving(health, WORKER_READY)
            after = await client.chat(request(7), timeout_s=20)
            assert after.text.startswith("stream number 7")
    finally:
        redis_server.stop()
