"""Reattach: a caller that lost its stream picks it up where it left off, on any frontend."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from mistral_serve.client import ChatClient
from mistral_serve.frontend.auth import key_digest
from mistral_serve.frontend.health import READINESS_SERVICE
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from mistral_serve.worker.health import READINESS_SERVICE as WORKER_READY
from tests.conftest import Processes
from tests.integration.conftest import Stack
from tests.support import raw_stream
from tests.support.health import wait_serving
from tests.support.raw_stream import raw_events
from tests.support.requests import chat, events_text
from tests.support.scripted_engine import ScriptedEngine
from tests.support.waiting import until


def request(i: int) -> chat_pb2.ChatRequest:
    r = chat(f"reattach me {i}")
    r.sampling.temperature = 0.0
    return r


async def collect(stream: object) -> list[chat_pb2.ChatEvent]:
    return [e async for e in stream]  # type: ignore[attr-defined]


async def follow_then_drop(port: int, text: str, deltas: int) -> tuple[str, list[chat_pb2.ChatEvent]]:
    """Start a stream at the raw stub, read `deltas` deltas, then drop the connection (no CancelChat, as
    a lost network or a killed caller would): the request id and the deltas read."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = chat_pb2_grpc.ChatServiceStub(channel).ChatStream(
            chat_pb2.ChatStreamRequest(request=chat(text)), timeout=60
        )
        first = await call.read()
        assert isinstance(first, chat_pb2.ChatEvent)
        seen = [event for _ in range(deltas) if isinstance(event := await call.read(), chat_pb2.ChatEvent)]
        call.cancel()
    return first.started.request_id, seen


def check_continuous(events: list[chat_pb2.ChatEvent]) -> None:
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("started") == 1 and kinds[0] == "started"
    assert kinds[-1] == "finished" and kinds.count("finished") == 1
    sequences = [e.delta.sequence for e in events if e.WhichOneof("event") == "delta"]
    assert sequences == list(range(1, len(sequences) + 1))


async def test_sigkill_of_a_frontend_mid_stream_is_invisible_to_reattaching_clients(
    processes: Processes,
) -> None:
    slow = {"SCRIPTED_TOKENS_PER_S": "40", "SCRIPTED_TOKENS": "120"}
    first, port_1 = await processes.spawn("frontend")
    _, port_2 = await processes.spawn("frontend")
    _, health = await processes.spawn("worker", **slow)
    for port in (port_1, port_2):
        await wait_serving(port, READINESS_SERVICE)
    await wait_serving(health, WORKER_READY)

    # pick_first: every stream goes to the first frontend while it lives, then to the second.
    async with ChatClient(f"ipv4:127.0.0.1:{port_1},127.0.0.1:{port_2}") as client:
        undisturbed = [
            events_text(e)
            for e in await asyncio.gather(*(collect(client.stream(request(i))) for i in range(16)))
        ]
        received: list[list[chat_pb2.ChatEvent]] = [[] for _ in range(16)]
        # At the raw stub, reattaching by hand as ChatClient does, but keeping what the frontend sends:
        # a resent delta must show as a repeated sequence.
        streams = [
            asyncio.create_task(follow_raw([port_1, port_2], request(i), received[i])) for i in range(16)
        ]
        await until(lambda: all(sum(e.WhichOneof("event") == "delta" for e in r) >= 3 for r in received))
        first.send_signal(signal.SIGKILL)
        assert not any(r[-1].WhichOneof("event") == "finished" for r in received)
        await asyncio.gather(*streams)

    for events in received:
        check_continuous(events)
    assert [events_text(r) for r in received] == undisturbed


async def follow_raw(
    ports: list[int], request: chat_pb2.ChatRequest, received: list[chat_pb2.ChatEvent]
) -> None:
    """Start `request` on the first port; each time a stream breaks (UNAVAILABLE), reattach on the
    next port after the last delta received. The reattached stream's `started` must name the same
    request; every other event is kept in `received` as sent."""
    request_id, last_sequence = "", 0
    for port in ports:
        message = raw_stream.reattach(request_id, last_sequence) if request_id else raw_stream.start(request)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = chat_pb2_grpc.ChatServiceStub(channel).ChatStream(message, timeout=60)
            try:
                async for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "started" and request_id:
                        assert event.started.request_id == request_id
                        continue
                    received.append(event)
                    if kind == "started":
                        request_id = event.started.request_id
                    elif kind == "delta":
                        last_sequence = event.delta.sequence
                    else:
                        return
            except grpc.aio.AioRpcError as lost:
                assert lost.code() == grpc.StatusCode.UNAVAILABLE, lost
    raise AssertionError(f"no terminal event on any of {ports}")


async def test_detached_request_runs_through_the_grace_then_frees_its_engine_slot(stack: Stack) -> None:
    frontend = await stack.frontend(detach_grace_s=1.5)
    engine = ScriptedEngine(tokens_per_s=20, default_tokens=1000)
    await stack.worker(engine, attach_check_interval_s=0.05, detach_grace_s=1.5)
    client = stack.client(frontend)
    request_id, _ = await follow_then_drop(frontend.port, "walk away", 1)  # and never comes back
    left_at = engine.emitted[request_id]

    # The request goes on generating without its caller (6 tokens at 20/s: well inside the grace).
    await until(lambda: engine.emitted[request_id] >= left_at + 6)
    assert engine.running_count() == 1, "the request must outlive its caller for the grace"
    await until(lambda: engine.running_count() == 0)
    assert request_id in engine.aborted_ids
    events = await collect(client.reattach(request_id))
    assert events[-1].error.code == grpc.StatusCode.CANCELLED.value[0]


async def test_reattach_within_the_grace_keeps_the_request_alive(stack: Stack) -> None:
    frontend = await stack.frontend(detach_grace_s=3.0)
    engine = ScriptedEngine(tokens_per_s=50, default_tokens=100)
    await stack.worker(engine, attach_check_interval_s=0.05)
    client = stack.client(frontend)
    request_id, seen = await follow_then_drop(frontend.port, "come back", 3)
    # Come back once the request went on without us: what it made meanwhile must reach us too.
    await until(lambda: engine.emitted[request_id] >= seen[-1].delta.sequence + 5)

    rest = await collect(client.reattach(request_id, seen[-1].delta.sequence))

    assert rest[0].started.request_id == request_id
    assert rest[-1].WhichOneof("event") == "finished"
    assert events_text(seen + rest[1:]) == " ".join(["come", "back"] + [f"w{i}" for i in range(1, 99)])
    assert engine.aborted_ids == []


async def test_reattach_to_a_finished_request_replays_it(stack: Stack) -> None:
    frontend = await stack.frontend()
    await stack.worker()
    original = await raw_events(frontend.port, raw_stream.start(chat("once more")))
    request_id = original[0].started.request_id

    replay = await raw_events(frontend.port, raw_stream.reattach(request_id))
    assert replay == original
    tail = await raw_events(frontend.port, raw_stream.reattach(request_id, last_sequence=5))
    assert [e.delta.sequence for e in tail if e.WhichOneof("event") == "delta"] == list(range(6, 13))


async def test_only_the_caller_who_started_a_request_may_reattach_or_cancel(stack: Stack) -> None:
    frontend = await stack.frontend(api_keys=(key_digest("key-a"), key_digest("key-b")))
    await stack.worker(ScriptedEngine(tokens_per_s=20, default_tokens=200))
    owner = stack.client(frontend, api_key="key-a")
    other = stack.client(frontend, api_key="key-b")
    stream = owner.stream(chat("mine"))
    request_id = (await anext(stream)).started.request_id

    details = []
    for attempt, asked in (
        (collect(other.reattach(request_id)), request_id),
        (other.cancel(request_id), request_id),
        (collect(owner.reattach("no-such-request")), "no-such-request"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await attempt
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        details.append((refused.value.details() or "").replace(asked, "<id>"))
    # Someone else's request reads exactly like one that does not exist.
    assert len(set(details)) == 1

    await owner.cancel(request_id)
    await owner.cancel(request_id)  # idempotent
    rest = await collect(stream)
    assert rest[-1].error.code == grpc.StatusCode.CANCELLED.value[0]


async def test_reattach_with_a_sequence_from_the_future_is_invalid_argument(stack: Stack) -> None:
    frontend = await stack.frontend()
    await stack.worker()
    client = stack.client(frontend)
    done = await collect(client.stream(chat("short")))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(client.reattach(done[0].started.request_id, last_sequence=13))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reattach.last_sequence" in (refused.value.details() or "")
