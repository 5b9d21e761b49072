"""Telemetry in an in-process stack: opt-in message contents, the queue gauges, deep health."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mistral_serve.frontend.server import start_frontend
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from mistral_serve.worker.app import start_worker
from mistral_serve.worker.engine import EngineOutput, EngineRequest
from mistral_serve.worker.health import DEEP_SERVICE
from mistral_serve.worker.settings import WorkerSettings
from tests.integration.conftest import Stack
from tests.support.health import wait_serving
from tests.support.requests import chat
from tests.support.scripted_engine import ScriptedEngine
from tests.support.waiting import until

QUEUE = {"pool": "default", "band": "normal"}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def worker_settings(stack: Stack, **overrides: object) -> WorkerSettings:
    base = WorkerSettings(
        redis_url=stack.redis_url, health_host="127.0.0.1", health_port=0, block_ms=200, metrics_port=None
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def generation_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = [s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]
    assert len(spans) == 1, spans
    return spans[0]


async def test_contents_are_recorded_only_when_opted_in(
    stack: Stack, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    frontend = await stack.frontend()
    worker = await start_worker(
        worker_settings(stack, trace_content=True), ScriptedEngine(), tracer_provider=provider
    )
    stack.workers.append(worker)
    client = stack.client(frontend)

    reply = await client.chat(chat("opted in words", max_tokens=3), timeout_s=30)

    attributes = generation_span(exporter).attributes or {}
    prompt = json.loads(str(attributes["gen_ai.input.messages"]))
    assert prompt == [{"role": "user", "parts": [{"type": "text", "content": "opted in words"}]}]
    output = json.loads(str(attributes["gen_ai.output.messages"]))
    assert output[0]["parts"][0]["content"] == reply.text == "opted in words"
    assert output[0]["finish_reason"] == "length"


async def test_queue_gauges_show_a_waiting_request_until_a_worker_takes_it(stack: Stack) -> None:
    frontend = await stack.frontend(metrics_sample_interval_s=0.05)
    metrics = frontend.metrics
    assert metrics is not None and frontend.metrics_port is not None
    client = stack.client(frontend)
    pending = asyncio.ensure_future(client.chat(chat("wait for me"), timeout_s=30))

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, QUEUE)

    await until(lambda: sample("mistral_serve_queue_lag") == 1, timeout_s=4)
    assert sample("mistral_serve_queue_depth") == 1
    # Sampled again while nobody takes the request, its wait has grown above zero.
    await until(lambda: (sample("mistral_serve_queue_oldest_waiting_seconds") or 0) > 0, timeout_s=4)

    await stack.worker()
    await pending
    await until(lambda: sample("mistral_serve_queue_depth") == 0, timeout_s=4)
    assert metrics.registry.get_sample_value("mistral_serve_queue_lag", QUEUE) == 0


class BrokenEngine(ScriptedEngine):
    """Loads, then fails every generation."""

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        raise RuntimeError("the GPU fell off the bus")
        yield  # pragma: no cover


async def test_deep_health_reports_a_one_token_generation(stack: Stack) -> None:
    healthy = await stack.worker(deep_health_interval_s=0.05)
    await wait_serving(healthy.health.port, DEEP_SERVICE, timeout_s=10)
    assert healthy.metrics is not None
    assert healthy.metrics.registry.get_sample_value("mistral_serve_worker_deep_health_ok") == 1

    broken = await stack.worker(BrokenEngine(), deep_health_interval_s=0.05)
    await wait_serving(broken.health.port, "mistral_serve.worker", timeout_s=10)  # ready: loaded, Redis up
    assert await broken.health.deep_check() is False
    metrics = broken.metrics
    assert metrics is not None
    await until(lambda: metrics.registry.get_sample_value("mistral_serve_worker_deep_health_ok") == 0, 2)


async def test_server_span_and_request_metrics_take_the_status_of_an_aborted_rpc(
    stack: Stack, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    frontend = await start_frontend(stack_frontend_settings(stack), tracer_provider=provider)
    stack.frontends.append(frontend)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Chat(chat_pb2.ChatRequest(), timeout=10)  # no messages: INVALID_ARGUMENT
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert span.name == "mistral_serve.v1.ChatService/Chat"
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert span.attributes["error.type"] == "INVALID_ARGUMENT"
    assert span.status.status_code == StatusCode.ERROR
    assert not [s for s in exporter.get_finished_spans() if s.kind == SpanKind.PRODUCER]  # never queued
    assert frontend.metrics is not None
    labels = {"door": "grpc", "method": "Chat", "outcome": "error", "code": "INVALID_ARGUMENT"}
    assert frontend.metrics.registry.get_sample_value("mistral_serve_requests_total", labels) == 1


def stack_frontend_settings(stack: Stack) -> FrontendSettings:
    return FrontendSettings(
        redis_url=stack.redis_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=None,
        http_port=0,
        health_interval_s=0.1,
    )
