"""The service on a Redis Cluster of three primaries and on a TLS-only Redis (a CA made here):
streaming, cancel (pub/sub), reattach and resume after a worker's SIGKILL, counted at the raw stub."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mistral_serve.v1 import chat_pb2
from tests.conftest import Processes
from tests.integration.conftest import Stack
from tests.integration.test_streaming import assert_well_formed
from tests.support.certs import TestCA
from tests.support.raw_stream import follow, raw_events, reattach, start
from tests.support.redis_topologies import Topology, start_cluster, start_tls
from tests.support.requests import chat, events_text
from tests.support.scripted_engine import ScriptedEngine
from tests.support.waiting import until


@pytest.fixture(scope="module", params=["cluster", "tls"])
def topology(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    folder = tmp_path_factory.mktemp(request.param)
    started = start_cluster(folder) if request.param == "cluster" else start_tls(folder, TestCA())
    yield started
    started.stop()


@pytest.fixture
async def mode_stack(topology: Topology) -> AsyncIterator[Stack]:
    built = Stack(topology.settings["redis_url"], redis_settings=topology.fields())
    yield built
    await built.close()


async def test_concurrent_streams_complete_well_formed(mode_stack: Stack) -> None:
    frontend = await mode_stack.frontend()
    await mode_stack.worker()
    streams = await asyncio.gather(
        *(raw_events(frontend.port, start(chat(f"stream {i}", max_tokens=6))) for i in range(16))
    )
    for i, events in enumerate(streams):
        assert_well_formed(events)
        assert events[-1].WhichOneof("event") == "finished"
        assert events_text(events) == f"stream {i} w1 w2 w3 w4"


async def test_cancel_reaches_the_running_job(mode_stack: Stack) -> None:
    # CancelChat travels on the pool's pub/sub channel: on a cluster, through the channel's node.
    frontend = await mode_stack.frontend()
    engine = ScriptedEngine(default_tokens=10_000, tokens_per_s=200)
    await mode_stack.worker(engine)
    client = mode_stack.client(frontend)
    events: list[chat_pb2.ChatEvent] = []

    async def follow() -> None:
        async for event in client.stream(chat("long")):
            events.append(event)

    task = asyncio.create_task(follow())
    await until(lambda: sum(e.WhichOneof("event") == "delta" for e in events) >= 2)
    await client.cancel(events[0].started.request_id)
    await asyncio.wait_for(task, timeout=20)
    assert events[-1].error.code == 1  # CANCELLED
    # The engine let go of it: the worker got the pub/sub message (the flag alone stops no running job).

    await until(lambda: engine.running_count() == 0)


async def test_reattach_replays_a_finished_request(mode_stack: Stack) -> None:
    frontend = await mode_stack.frontend()
    await mode_stack.worker()
    first = await raw_events(frontend.port, start(chat("replay me", max_tokens=5)))
    request_id = first[0].started.request_id
    other = await mode_stack.frontend()
    replay = await raw_events(other.port, reattach(request_id, last_sequence=2))
    deltas = [e.delta.sequence for e in replay if e.WhichOneof("event") == "delta"]
    assert deltas == [3, 4, 5]
    assert replay[-1].WhichOneof("event") == "finished"


async def test_sigkill_of_a_worker_mid_stream_resumes_on_another(
    topology: Topology, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    processes = Processes(topology.settings["redis_url"], subprocess_env, tmp_path)
    slow = {"SCRIPTED_TOKENS_PER_S": "60", "SCRIPTED_TOKENS": "120", "lease_ms": "900"}
    try:
        front = await processes.start("frontend", **topology.settings)
        worker_a = await processes.start("worker", **topology.settings, **slow)
        await processes.launcher.ready_all([front, worker_a])
        results: list[list[chat_pb2.ChatEvent]] = [[] for _ in range(8)]
        streams = [
            asyncio.create_task(follow(front.ports["grpc"], start(chat(f"resume {i}")), results[i]))
            for i in range(8)
        ]
        worker_b = await processes.start("worker", **topology.settings, **slow)
        await processes.launcher.ready(worker_b)
        await until(lambda: all(len(events) >= 4 for events in results))  # A streams every one
        worker_a.process.send_signal(signal.SIGKILL)
        assert all(events[-1].WhichOneof("event") == "delta" for events in results)
        await asyncio.gather(*streams)
    finally:
        processes.stop_all()
    for events in results:
        assert_well_formed(events)
        assert events[-1].WhichOneof("event") == "finished"
        assert events_text(events).split()[-1] == "w118"  # all 120 tokens (the prompt echoed is two)
