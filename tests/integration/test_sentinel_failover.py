"""Sentinel failover for real: a primary, a replica and three sentinels; a frontend and two workers
(processes, scripted engine); SIGKILL of the primary while 32 streams run. Counted at the raw stub:
streams completed, failed (by code, each must be retryable), duplicated or skipped sequences, and the
time until a new request is admitted again. docs/redis.md records what this measures."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mistral_serve.v1 import chat_pb2
from tests.conftest import Processes
from tests.support.raw_stream import follow, raw_events, start
from tests.support.redis_topologies import Topology, primary_port, start_sentinels
from tests.support.requests import chat
from tests.support.waiting import until, until_async

STREAMS = 32
SLOW = {"SCRIPTED_TOKENS_PER_S": "40", "SCRIPTED_TOKENS": "120", "lease_ms": "1500"}


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Topology]:
    started = start_sentinels(tmp_path / "redis")
    yield started
    started.stop()


async def _stream(port: int, i: int, sink: list[chat_pb2.ChatEvent]) -> str | None:
    """Follow one stream; the gRPC status code's name when it ends with one instead of an event."""
    try:
        await follow(port, start(chat(f"failover {i}")), sink, timeout_s=90)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return None


def _sequence_faults(events: list[chat_pb2.ChatEvent]) -> tuple[int, int]:
    """(duplicated, skipped) delta sequences of one stream as the caller saw it."""
    duplicated = skipped = 0
    last = 0
    for event in events:
        if event.WhichOneof("event") != "delta":
            continue
        sequence = event.delta.sequence
        if sequence <= last:
            duplicated += 1
        elif sequence > last + 1:
            skipped += sequence - last - 1
        last = max(last, sequence)
    return duplicated, skipped


async def _admitted_again(port: int, since: float, timeout_s: float = 60.0) -> float:
    """Seconds from `since` until a new request gets its `started` event."""

    async def admitted() -> bool:
        try:
            events = await raw_events(port, start(chat("probe", max_tokens=1)), timeout_s=5)
        except grpc.aio.AioRpcError:
            return False
        return bool(events) and events[0].WhichOneof("event") == "started"

    await until_async(admitted, timeout_s=timeout_s, interval_s=0.1)
    return time.monotonic() - since


@pytest.mark.parametrize("wait_replicas", ["0", "1"])
async def test_sigkill_of_the_primary_mid_stream(
    sentinels: Topology, subprocess_env: dict[str, str], tmp_path: Path, wait_replicas: str
) -> None:
    processes = Processes(sentinels.settings["redis_url"], subprocess_env, tmp_path)
    settings = {**sentinels.settings, "redis_wait_replicas": wait_replicas}
    try:
        front = await processes.start("frontend", **settings)
        workers = [await processes.start("worker", **settings, **SLOW) for _ in range(2)]
        await processes.launcher.ready_all([front, *workers])
        port = front.ports["grpc"]
        results: list[list[chat_pb2.ChatEvent]] = [[] for _ in range(STREAMS)]
        tasks = [asyncio.create_task(_stream(port, i, results[i])) for i in range(STREAMS)]
        await until(lambda: all(len(events) >= 10 for events in results), timeout_s=60)
        old_primary = primary_port(sentinels)
        killed_at = time.monotonic()
        sentinels.kill("primary")
        admitted_after_s = await _admitted_again(port, killed_at)
        statuses = await asyncio.gather(*tasks)
        new_primary = primary_port(sentinels)
    finally:
        processes.stop_all()

    ends: collections.Counter[str] = collections.Counter()
    not_retryable = duplicated = skipped = 0
    for events, status in zip(results, statuses, strict=True):
        dup, skip = _sequence_faults(events)
        duplicated, skipped = duplicated + dup, skipped + skip
        last = events[-1] if events else None
        if status is not None:
            ends[f"status {status}"] += 1
        elif last is not None and last.WhichOneof("event") == "finished":
            ends["completed"] += 1
        elif last is not None and last.WhichOneof("event") == "error":
            ends[f"error {last.error.code}"] += 1
            not_retryable += not last.error.retryable
        else:
            ends["no terminal event"] += 1
    print(
        f"\nsentinel failover, WAIT {wait_replicas}: {dict(ends)}; "
        f"duplicated sequences {duplicated}, skipped {skipped}; "
        f"admitted again {admitted_after_s:.1f}s after the kill; primary port {old_primary}->{new_primary}"
    )
    assert new_primary != old_primary, "the sentinels never failed over"
    assert duplicated == 0, "a caller received a token twice"
    assert skipped == 0, "a caller missed a token"
    assert not_retryable == 0, "a stream ended with an error the caller may not retry"
    assert ends["no terminal event"] == 0
    assert ends["completed"] == STREAMS, f"every stream completes: {dict(ends)}"
