"""A caller that stops reading a stream early, at a real frontend with a real Redis and a worker:
the frontend's SERVER span still ends cleanly, and a ChatClient whose caller stops says so."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mistral_serve.client import ChatClient
from mistral_serve.common import keys
from mistral_serve.frontend.server import start_frontend
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from tests.integration.conftest import Stack
from tests.support.requests import chat
from tests.support.scripted_engine import ScriptedEngine
from tests.support.waiting import until

STREAM_METHOD = "mistral_serve.v1.ChatService/ChatStream"


async def test_a_stream_closed_early_ends_its_server_span_without_a_context_error(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = FrontendSettings(
        redis_url=stack.redis_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=None,
        health_interval_s=0.1,
    )
    frontend = await start_frontend(settings, tracer_provider=provider)
    stack.frontends.append(frontend)
    await stack.worker(ScriptedEngine(tokens_per_s=20, default_tokens=200))

    def server_spans() -> list[object]:
        return [
            s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER and s.name == STREAM_METHOD
        ]

    with caplog.at_level(logging.ERROR):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
            call = chat_pb2_grpc.ChatServiceStub(channel).ChatStream(
                chat_pb2.ChatStreamRequest(request=chat("close me early")), timeout=30
            )
            async for event in call:
                if event.WhichOneof("event") == "delta":
                    break
            call.cancel()
            await until(lambda: len(server_spans()) == 1)

    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []
    (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert span.end_time is not None
    assert span.attributes is not None
    assert span.attributes["error.type"] == "CANCELLED"
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert span.attributes["mistral_serve.request_id"]
    assert [e.name for e in span.events] == ["first token"]


async def started_client_stream(stack: Stack) -> tuple[ChatClient, ScriptedEngine, aioredis.Redis]:
    frontend = await stack.frontend(detach_grace_s=60.0)
    engine = ScriptedEngine(tokens_per_s=20, default_tokens=400)
    await stack.worker(engine)
    return stack.client(frontend), engine, aioredis.Redis.from_url(stack.redis_url)


async def assert_cancelled(engine: ScriptedEngine, redis: aioredis.Redis, request_id: str) -> None:
    # Within far less than the detach grace (60 s): only a CancelChat stops the request this soon.
    await until(lambda: request_id in engine.aborted_ids, timeout_s=15)
    assert await redis.exists(keys.cancel_flag("default", request_id))
    await redis.aclose()


async def test_a_caller_that_stops_iterating_cancels_its_request(stack: Stack) -> None:
    client, engine, redis = await started_client_stream(stack)
    request_id = ""
    async for event in client.stream(chat("stop reading me")):
        if event.WhichOneof("event") == "started":
            request_id = event.started.request_id
        if event.WhichOneof("event") == "delta":
            break
    await assert_cancelled(engine, redis, request_id)


async def test_a_caller_whose_task_is_cancelled_cancels_its_request(stack: Stack) -> None:
    client, engine, redis = await started_client_stream(stack)
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def follow() -> None:
        request_id = ""
        async for event in client.stream(chat("cancel my task")):
            if event.WhichOneof("event") == "started":
                request_id = event.started.request_id
            if event.WhichOneof("event") == "delta" and not started.done():
                started.set_result(request_id)

    task = asyncio.create_task(follow())
    request_id = await asyncio.wait_for(started, 15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_cancelled(engine, redis, request_id)


async def test_a_caller_that_leaves_after_the_end_cancels_nothing(stack: Stack) -> None:
    frontend = await stack.frontend()
    engine = ScriptedEngine()
    await stack.worker(engine)
    redis = aioredis.Redis.from_url(stack.redis_url)
    events = []
    # Closed at once on leaving (not later, by the collector): what it sends on closing is sent by then.
    async with contextlib.aclosing(
        stack.client(frontend).stream(chat("read me whole", max_tokens=3))
    ) as stream:
        async for event in stream:
            events.append(event)
            if event.WhichOneof("event") == "finished":
                break  # the end was read: leaving now is no cancel
    assert events[-1].WhichOneof("event") == "finished"
    assert not await redis.exists(keys.cancel_flag("default", events[0].started.request_id))
    await redis.aclose()
