"""Issue 15: whole answers or one clear error when Redis or a worker fails, counted at the raw stub.

Real processes on loopback: a frontend, scripted-engine workers, a redis-server SIGKILLed and started
again on the same port (empty, or from its AOF). Every event is counted as the frontend sent it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import redis.asyncio

from mistral_serve.common.event_log import read_records
from mistral_serve.frontend.health import READINESS_SERVICE
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from mistral_serve.worker.health import READINESS_SERVICE as WORKER_READY
from tests.conftest import Processes, RedisServer, start_redis
from tests.support.health import wait_serving
from tests.support.raw_stream import raw_events, reattach, start
from tests.support.requests import chat, events_text
from tests.support.waiting import until

STREAMS = 24
TOKENS = 100
LOST = "the answer was lost with the queue; send it again"
AOF = ("--appendonly", "yes", "--appendfsync", "always")


def request(i: int) -> chat_pb2.ChatRequest:
    r = chat(f"stream number {i}")
    r.sampling.temperature = 0.0
    return r


def undisturbed(i: int) -> str:
    """What the scripted engine answers request(i), run once without faults."""
    return " ".join((f"stream number {i}".split() + [f"w{k}" for k in range(1, TOKENS)])[:TOKENS])


class RawStream:
    """One ChatStream at the raw stub: every event as sent, and when each arrived."""

    def __init__(self) -> None:
        self.events: list[chat_pb2.ChatEvent] = []
        self.arrived: list[float] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.redis_back_at = 0.0
        self.held_deltas: list[int] = []
        self.replayed: list[chat_pb2.ChatEvent] = []

    async def run(self, port: int, req: chat_pb2.ChatRequest, timeout_s: float) -> RawStream:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            try:
                async for event in stub.ChatStream(start(req), timeout=timeout_s):
                    self.events.append(event)
                    self.arrived.append(time.monotonic())
            except grpc.aio.AioRpcError as exc:
                self.error = exc
        return self

    @property
    def deltas(self) -> list[int]:
        return [e.delta.sequence for e in self.events if e.WhichOneof("event") == "delta"]

    @property
    def terminal(self) -> chat_pb2.ChatEvent | None:
        ends = [e for e in self.events if e.WhichOneof("event") in ("finished", "error")]
        assert len(ends) <= 1, "more than one terminal event"
        return ends[0] if ends else None

    @property
    def longest_pause_s(self) -> float:
        return max((b - a for a, b in zip(self.arrived, self.arrived[1:], strict=False)), default=0.0)

    def check_shape(self) -> None:
        """`started`, deltas 1..n with no gap or repeat, then exactly one terminal event, last."""
        assert self.error is None, f"the stream ended without a terminal event: {self.error}"
        assert self.events[0].WhichOneof("event") == "started"
        assert self.deltas == list(range(1, len(self.deltas) + 1)), f"gap or repeat: {self.deltas}"
        assert self.terminal is self.events[-1]


async def start_stack(processes: Processes, **worker: str) -> tuple[int, int]:
    _, port = await processes.spawn("frontend")
    _, health = await processes.spawn("worker", **worker)
    await wait_serving(port, READINESS_SERVICE)
    await wait_serving(health, WORKER_READY)
    return port, health


async def admitted_again(port: int, health: int) -> None:
    """The service recovered by itself: a new request is admitted and answered."""
    await wait_serving(port, READINESS_SERVICE)
    await wait_serving(health, WORKER_READY)
    after = await RawStream().run(port, request(99), timeout_s=20)
    after.check_shape()
    assert events_text(after.events) == undisturbed(99)


async def run_through_redis_kill(
    processes: Processes, tmp_path: Path, redis_flags: tuple[str, ...], timeout_s: float, **worker: str
) -> list[RawStream]:
    """24 streams, half of them running and half queued, while Redis is SIGKILLed and started again."""
    server: RedisServer = start_redis(tmp_path, flags=redis_flags)
    processes.redis_url = server.url
    try:
        port, health = await start_stack(
            processes,
            SCRIPTED_TOKENS_PER_S="25",
            SCRIPTED_TOKENS=str(TOKENS),
            worker_max_inflight="12",
            **worker,
        )
        streams = [RawStream() for _ in range(STREAMS)]
        tasks = [asyncio.create_task(s.run(port, request(i), timeout_s)) for i, s in enumerate(streams)]
        await until(lambda: sum(len(s.deltas) >= 5 for s in streams) >= 12)
        server.kill()
        server = start_redis(tmp_path, port=server.port, flags=redis_flags)
        for stream in streams:
            stream.redis_back_at = time.monotonic()
        results = await asyncio.gather(*tasks)
        await admitted_again(port, health)
        # What Redis holds of each request afterwards (what a reattach or a resume reads).
        client = redis.asyncio.Redis(port=server.port)
        try:
            for stream in results:
                records = await read_records(client, "default", stream.events[0].started.request_id)
                stream.held_deltas = [
                    e.delta.sequence for _, r in records for e in r.events if e.WhichOneof("event") == "delta"
                ]
        finally:
            await client.aclose()
        # A caller who reattaches after the restart gets the whole answer again (owner key restored).
        for stream in results:
            if stream.terminal is not None and stream.terminal.WhichOneof("event") == "finished":
                stream.replayed = await raw_events(port, reattach(stream.events[0].started.request_id))
        return results
    finally:
        server.stop()


async def test_redis_without_persistence_restarted_mid_run_loses_nothing_silently(
    processes: Processes, tmp_path: Path
) -> None:
    # A stream deadline far below the default 10 minutes: a lost request must end well before it.
    streams = await run_through_redis_kill(processes, tmp_path, (), timeout_s=30)
    finished = lost = 0
    lost_after: list[float] = []
    for i, stream in enumerate(streams):
        stream.check_shape()
        end = stream.terminal
        assert end is not None
        if end.WhichOneof("event") == "finished":
            assert events_text(stream.events) == undisturbed(i), "finished, but not the whole answer"
            # Its worker wrote back what Redis lost: a reattach or a resume reads the whole answer.
            assert stream.held_deltas == list(range(1, TOKENS + 1)), stream.held_deltas[:5]
            assert events_text(stream.replayed) == undisturbed(i), "a reattach must replay it whole"
            finished += 1
        else:
            # One retryable error, never a cancel of a request whose caller is attached.
            assert (end.error.code, end.error.message, end.error.retryable) == (
                grpc.StatusCode.UNAVAILABLE.value[0],
                LOST,
                True,
            ), end
            lost += 1
            lost_after.append(stream.arrived[-1] - stream.redis_back_at)
    print(f"no persistence: {finished} finished whole (written back), {lost} lost, none silently")
    if lost_after:
        print(f"lost requests ended {min(lost_after):.2f}-{max(lost_after):.2f}s after Redis was back")
    assert finished >= 12, "the running requests' worker holds them and must write them back"


async def test_redis_restarted_from_its_aof_completes_every_request(
    processes: Processes, tmp_path: Path
) -> None:
    # A lease longer than the streams' deadline: a job that had to wait for its lease fails the test.
    streams = await run_through_redis_kill(processes, tmp_path, AOF, timeout_s=40, lease_ms="600000")
    for i, stream in enumerate(streams):
        stream.check_shape()
        assert stream.terminal is not None and stream.terminal.WhichOneof("event") == "finished"
        assert events_text(stream.events) == undisturbed(i)


async def test_worker_sigkill_under_24_streams_resumes_token_exact_in_seconds(processes: Processes) -> None:
    slow = {"SCRIPTED_TOKENS_PER_S": "25", "SCRIPTED_TOKENS": str(TOKENS)}  # default lease and checks
    _, port = await processes.spawn("frontend")
    worker_a, a_health = await processes.spawn("worker", **slow)
    await wait_serving(port, READINESS_SERVICE)
    await wait_serving(a_health, WORKER_READY)
    streams = [RawStream() for _ in range(STREAMS)]
    tasks = [asyncio.create_task(s.run(port, request(i), 60)) for i, s in enumerate(streams)]
    await until(lambda: all(len(s.deltas) >= 5 for s in streams))
    _, b_health = await processes.spawn("worker", **slow)  # idle until A is lost: A holds every job
    await wait_serving(b_health, WORKER_READY)
    worker_a.send_signal(signal.SIGKILL)
    await asyncio.gather(*tasks)

    for i, stream in enumerate(streams):
        stream.check_shape()
        assert stream.terminal is not None and stream.terminal.WhichOneof("event") == "finished"
        assert events_text(stream.events) == undisturbed(i)
    pauses = sorted(s.longest_pause_s for s in streams)
    print(f"worker SIGKILL, default lease: longest pause {pauses[-1]:.2f}s, median {pauses[12]:.2f}s")
    await admitted_again(port, b_health)
