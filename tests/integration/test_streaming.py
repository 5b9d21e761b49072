"""The end-to-end path in one process: real frontend, real Redis, worker with the scripted engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import redis

from mistral_serve.client.client import retry_delay
from mistral_serve.common import keys
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from tests.integration.conftest import Stack
from tests.support.requests import chat, events_text
from tests.support.scripted_engine import ScriptedEngine
from tests.support.waiting import until


def assert_well_formed(events: list[chat_pb2.ChatEvent]) -> None:
    """started first, deltas numbered 1..n with no gap, exactly one terminal event, last."""
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started"
    assert kinds[-1] in ("finished", "error")
    assert sum(k in ("finished", "error") for k in kinds) == 1
    sequences = [e.delta.sequence for e in events if e.WhichOneof("event") == "delta"]
    assert sequences == list(range(1, len(sequences) + 1))


async def test_stream_delivers_ordered_gapless_deltas_and_one_terminal_event(stack: Stack) -> None:
    frontend = await stack.frontend()
    await stack.worker()
    client = stack.client(frontend)

    events = [e async for e in client.stream(chat("tell me a story"))]

    assert_well_formed(events)
    assert events_text(events) == "tell me a story w1 w2 w3 w4 w5 w6 w7 w8"
    finished = events[-1].finished
    assert finished.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert finished.usage.completion_tokens == 12
    assert finished.usage.prompt_tokens == 4
    assert sum(e.delta.token_count for e in events if e.WhichOneof("event") == "delta") == 12
    assert 0 <= finished.timings.time_to_first_token_seconds <= finished.timings.total_seconds


async def test_max_tokens_ends_with_length(stack: Stack) -> None:
    frontend = await stack.frontend()
    await stack.worker()
    events = [e async for e in stack.client(frontend).stream(chat("a b c", max_tokens=2))]
    assert events_text(events) == "a b"
    assert events[-1].finished.finish_reason == chat_pb2.FINISH_REASON_LENGTH


async def test_unary_chat_returns_the_streamed_text(stack: Stack) -> None:
    frontend = await stack.frontend()
    await stack.worker()
    client = stack.client(frontend)

    streamed = events_text([e async for e in client.stream(chat("same words"))])
    response = await client.chat(chat("same words"))

    assert response.text == streamed
    assert response.request_id
    assert response.finished.finish_reason == chat_pb2.FINISH_REASON_STOP


async def test_64_concurrent_streams_all_complete(stack: Stack) -> None:
    frontend = await stack.frontend()
    await stack.worker(ScriptedEngine(tokens_per_s=500))
    client = stack.client(frontend)

    async def one(i: int) -> list[chat_pb2.ChatEvent]:
        return [e async for e in client.stream(chat(f"stream {i}"))]

    results = await asyncio.gather(*(one(i) for i in range(64)))

    for i, events in enumerate(results):
        assert_well_formed(events)
        assert events_text(events).startswith(f"stream {i} w1")
        assert events[-1].WhichOneof("event") == "finished"
    request_ids = {events[0].started.request_id for events in results}
    assert len(request_ids) == 64


async def test_worker_coalesces_event_writes(stack: Stack) -> None:
    frontend = await stack.frontend()
    worker = await stack.worker(ScriptedEngine(tokens_per_s=0, default_tokens=200), flush_interval_ms=20)
    client = stack.client(frontend)

    results = await asyncio.gather(*(_collect(client.stream(chat(f"x{i}"))) for i in range(8)))

    deltas = sum(len([e for e in events if e.WhichOneof("event") == "delta"]) for events in results)
    assert all(events_text(events).split()[-1] == "w199" for events in results)
    # 8 streams x 200 tokens, written in far fewer round trips than one per token.
    assert worker.writer.writes < deltas / 10


async def test_full_queue_answers_resource_exhausted_with_retry_info(stack: Stack) -> None:
    frontend = await stack.frontend(max_backlog=3, retry_after_s=0.5)
    client = stack.client(frontend, max_attempts=1)
    # No worker yet: three requests wait in the queue and fill it.
    admitted = [asyncio.create_task(_collect(client.stream(chat(f"queued {i}")))) for i in range(3)]
    await until(lambda: backlog(stack) == 3)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _collect(client.stream(chat("one too many")))

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay(refused.value) == pytest.approx(0.5)
    await stack.worker()
    for i, task in enumerate(admitted):
        events = await task
        assert_well_formed(events)
        assert events_text(events).startswith(f"queued {i}")


async def test_client_retry_waits_out_a_full_queue(stack: Stack) -> None:
    frontend = await stack.frontend(max_backlog=1, retry_after_s=0.2)
    client = stack.client(frontend, max_attempts=20)
    first = asyncio.create_task(_collect(client.stream(chat("first"))))
    await until(lambda: backlog(stack) == 1)
    second = asyncio.create_task(client.chat(chat("second")))
    assert frontend.metrics is not None
    registry = frontend.metrics.registry
    full = {"pool": "default", "band": "normal", "result": "full"}
    # The second is refused, and retried and refused again, while the first holds the queue.
    await until(lambda: (registry.get_sample_value("mistral_serve_queue_admissions_total", full) or 0) >= 2)
    assert not second.done()

    await stack.worker()

    assert events_text(await first).startswith("first")
    assert (await second).text.startswith("second")


async def test_a_caller_that_goes_away_aborts_the_job_in_the_engine(stack: Stack) -> None:
    frontend = await stack.frontend(detach_grace_s=0.3)
    engine = ScriptedEngine(tokens_per_s=50, default_tokens=1000)
    await stack.worker(engine, attach_check_interval_s=0.05)
    client = stack.client(frontend)

    stream = client.stream(chat("long one"))
    started = await anext(stream)
    await anext(stream)  # a first delta: the job runs in the engine
    assert engine.running_count() == 1
    await stream.aclose()  # the caller goes away: ChatClient cancels it (test_early_close.py)

    request_id = started.started.request_id
    await until(lambda: request_id in engine.aborted_ids)
    await until(lambda: engine.running_count() == 0)


async def test_expired_deadline_never_reaches_the_engine(stack: Stack) -> None:
    frontend = await stack.frontend()
    client = stack.client(frontend, max_attempts=1)

    # Either the gRPC deadline ends the call, or the frontend's own timer wins the race and sends
    # the terminal error event: both tell the caller DEADLINE_EXCEEDED.
    try:
        events = await _collect(client.stream(chat("too late"), timeout_s=0.3))
        assert events[-1].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    except grpc.aio.AioRpcError as expired:
        assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    engine = ScriptedEngine()
    await stack.worker(engine)
    await until(lambda: backlog(stack) == 0)
    assert engine.started_ids == []


async def test_engine_refusal_becomes_invalid_argument_and_others_complete(stack: Stack) -> None:
    frontend = await stack.frontend()
    await stack.worker()
    client = stack.client(frontend)

    refused, fine = await asyncio.gather(
        _collect(client.stream(chat("[fail] please"))), _collect(client.stream(chat("fine")))
    )

    assert refused[-1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert fine[-1].WhichOneof("event") == "finished"
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await client.chat(chat("[fail] again"))
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_get_model_info_describes_the_served_model(stack: Stack) -> None:
    frontend = await stack.frontend()
    info = await stack.client(frontend).model_info()
    assert info.model == "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    assert info.context_length == 131072
    assert info.max_images_per_prompt == 10
    assert info.supports_tools and info.supports_images


@pytest.mark.parametrize("setting", [True, False])
async def test_get_model_info_says_whether_the_default_system_prompt_is_added(
    stack: Stack, setting: bool
) -> None:
    frontend = await stack.frontend(default_system_prompt=setting)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
        info = await chat_pb2_grpc.ChatServiceStub(channel).GetModelInfo(chat_pb2.GetModelInfoRequest())
    assert info.default_system_prompt is setting


def backlog(stack: Stack) -> int:
    """The normal band's requests waiting (in the fair queue) plus running (in the stream)."""
    client = redis.Redis.from_url(stack.redis_url)
    waiting = int(client.llen(keys.waiting_count("default", keys.NORMAL)))  # type: ignore[arg-type]
    return waiting + int(client.xlen(keys.request_stream("default")))  # type: ignore[arg-type]


async def _collect(stream: AsyncIterator[chat_pb2.ChatEvent]) -> list[chat_pb2.ChatEvent]:
    return [e async for e in stream]


async def test_request_cancelled_while_queued_never_reaches_the_engine(stack: Stack) -> None:
    frontend = await stack.frontend()
    client = stack.client(frontend)
    stream = client.stream(chat("never mind"))
    request_id = (await anext(stream)).started.request_id
    await client.cancel(request_id)  # still queued: no worker yet

    engine = ScriptedEngine()
    await stack.worker(engine)
    rest = await _collect(stream)

    assert rest[-1].error.code == grpc.StatusCode.CANCELLED.value[0]
    assert engine.started_ids == []


async def test_a_finished_requests_events_expire_after_the_retention(stack: Stack) -> None:
    frontend = await stack.frontend()
    await stack.worker(ScriptedEngine(default_tokens=200), event_ttl_s=77, flush_max_events=4)
    events = await _collect(stack.client(frontend).stream(chat("keep me a while")))
    ttl = redis.Redis.from_url(stack.redis_url).ttl(
        keys.events_stream("default", events[0].started.request_id)
    )
    assert 0 < int(ttl) <= 77  # type: ignore[arg-type]


async def test_the_frontends_deadline_ends_a_busy_stream_with_one_error_and_cancels_it(stack: Stack) -> None:
    """No gRPC deadline: the service's default one passes while deltas still flow. The stream ends
    with one DEADLINE_EXCEEDED event (raw stub: nothing retries), and the job is cancelled. The
    frontend's own timer sends it (retryable), before the worker's deadline error could come back."""
    frontend = await stack.frontend(default_deadline_s=0.6)
    engine = ScriptedEngine(tokens_per_s=100, default_tokens=10_000)
    await stack.worker(engine, attach_check_interval_s=0.05)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
        call = chat_pb2_grpc.ChatServiceStub(channel).ChatStream(
            chat_pb2.ChatStreamRequest(request=chat("a long answer"))
        )
        events = [event async for event in call]
    assert_well_formed(events)
    assert [e.WhichOneof("event") for e in events].count("delta") > 0
    assert events[-1].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert events[-1].error.retryable
    await until(lambda: events[0].started.request_id in engine.aborted_ids)
