"""The frontend's SERVER span around a stream that its caller leaves early.

gRPC may leave a response generator suspended at a `yield` when the call is cancelled; the event loop
then closes it later, from a task of its own (another context). Driven here exactly that way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any, cast

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mistral_serve.common.telemetry import get_tracer
from mistral_serve.frontend.metrics import FrontendMetrics
from mistral_serve.frontend.tracing import ServerTelemetry, _Call
from mistral_serve.v1 import chat_pb2


class ServicerContext:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    def code(self) -> grpc.StatusCode | None:
        return None

    def details(self) -> str | None:
        return None


async def endless_stream(request: Any, context: Any) -> AsyncGenerator[chat_pb2.ChatEvent, None]:
    yield chat_pb2.ChatEvent(started=chat_pb2.Started(request_id="r1"))
    sequence = 0
    while True:
        sequence += 1
        # The servicer sees the SERVER span as the current one while it runs.
        assert trace.get_current_span().get_span_context().is_valid
        yield chat_pb2.ChatEvent(delta=chat_pb2.Delta(sequence=sequence, text="x"))


async def test_a_stream_closed_from_another_task_ends_its_span_without_a_context_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    owner = ServerTelemetry(get_tracer(provider), FrontendMetrics("default"))
    call = _Call(owner, "/mistral_serve.v1.ChatService/ChatStream", ())
    stream = call.stream(endless_stream)(None, cast(Any, ServicerContext()))

    async def first_two() -> None:
        await stream.__anext__()
        await stream.__anext__()

    with caplog.at_level(logging.ERROR):
        await asyncio.create_task(first_two())
        await asyncio.create_task(stream.aclose())  # as the loop's async-generator finalizer does

    assert [r.getMessage() for r in caplog.records] == []
    assert not trace.get_current_span().get_span_context().is_valid, "the span leaked into this context"
    (span,) = exporter.get_finished_spans()
    assert span.name == "mistral_serve.v1.ChatService/ChatStream"
    assert span.attributes is not None
    assert span.attributes["error.type"] == "CANCELLED"
    assert span.attributes["mistral_serve.request_id"] == "r1"
    assert [e.name for e in span.events] == ["first token"]
