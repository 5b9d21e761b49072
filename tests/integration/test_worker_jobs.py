"""A worker's jobs against a real redis-server and a real frontend: how it reads the queue, which run
of a job a span reports, how it stops when its engine goes with it, and its deep-health gauge."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mistral_serve.common import keys
from mistral_serve.common.telemetry import get_tracer
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from mistral_serve.worker.app import Worker, start_worker
from mistral_serve.worker.consumer import Consumer
from mistral_serve.worker.engine import EngineOutput, EngineRequest, EngineStopped
from mistral_serve.worker.events import EventWriter
from mistral_serve.worker.metrics import WorkerMetrics
from mistral_serve.worker.settings import WorkerSettings
from mistral_serve.worker.tracing import WorkerTelemetry
from tests.integration.conftest import Stack
from tests.support.requests import chat, events_text
from tests.support.scripted_engine import ScriptedEngine
from tests.support.waiting import until


class Follower:
    """One ChatStream at the raw stub, its events gathered as they come."""

    def __init__(self, channel: grpc.aio.Channel, request: chat_pb2.ChatRequest) -> None:
        self.events: list[chat_pb2.ChatEvent] = []
        call = chat_pb2_grpc.ChatServiceStub(channel).ChatStream(
            chat_pb2.ChatStreamRequest(request=request), timeout=60
        )
        self.done = asyncio.ensure_future(self._gather(call))

    async def _gather(self, call: grpc.aio.UnaryStreamCall[Any, chat_pb2.ChatEvent]) -> None:
        async for event in call:
            self.events.append(event)

    @property
    def deltas(self) -> int:
        return sum(1 for e in self.events if e.WhichOneof("event") == "delta")


async def lose(worker: Worker) -> None:
    """The worker vanishes as a killed process would: nothing acked, nothing handed back."""
    tasks = [*worker.tasks, *(job.task for job in worker.consumer.held() if job.task is not None)]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def traced_worker(stack: Stack, provider: TracerProvider, engine: ScriptedEngine) -> Worker:
    settings = WorkerSettings(
        redis_url=stack.redis_url,
        health_host="127.0.0.1",
        health_port=0,
        block_ms=200,
        lease_ms=600,
        metrics_port=None,
    )
    worker = await start_worker(settings, engine, tracer_provider=provider)
    stack.workers.append(worker)
    return worker


async def test_reading_the_queue_blocks_only_when_no_band_had_a_job(redis_url: str) -> None:
    pool = f"guard-{uuid.uuid4().hex}"
    client = aioredis.Redis.from_url(redis_url)
    writer = EventWriter(client, pool=pool, ttl_s=60, interval_s=0.01, max_events=8)
    telemetry = WorkerTelemetry(get_tracer(), WorkerMetrics("m"))
    # A block far longer than the wait below: a read that blocks after starting a job never returns in time.
    consumer = Consumer(
        client,
        ScriptedEngine(),
        writer,
        telemetry,
        pool=pool,
        consumer_name="c",
        max_inflight=4,
        block_ms=600_000,
    )
    await consumer.ensure_group()
    queued = queue_pb2.QueuedRequest(request_id="r1", request=chat("one job"), deadline_unix=time.time() + 60)
    await client.xadd(keys.request_stream(pool), {keys.REQUEST_FIELD: queued.SerializeToString()})
    try:
        assert await asyncio.wait_for(consumer.read_new(4), timeout=30) == 1
    finally:
        await consumer.drain(0)
        await client.aclose()


async def test_a_resumed_run_reports_attempt_two(stack: Stack) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    frontend = await stack.frontend()
    first = await traced_worker(stack, provider, ScriptedEngine(tokens_per_s=50, default_tokens=40))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
        follower = Follower(channel, chat("resume me"))
        await until(lambda: follower.deltas >= 3)
        await lose(first)
        await traced_worker(stack, provider, ScriptedEngine(tokens_per_s=500, default_tokens=40))
        await asyncio.wait_for(follower.done, 60)

    assert follower.events[-1].WhichOneof("event") == "finished"
    started = [
        dict(event.attributes or {})
        for span in exporter.get_finished_spans()
        if span.name.startswith("chat ")
        for event in span.events
        if event.name == "started"
    ]
    assert sorted(cast(int, s["mistral_serve.attempt"]) for s in started) == [1, 2]
    resumed = next(s for s in started if s["mistral_serve.attempt"] == 2)
    assert cast(int, resumed["mistral_serve.resumed_tokens"]) >= 3


class DyingEngine(ScriptedEngine):
    """vLLM under Ctrl-C: the signal reaches its engine process too, which dies under running requests."""

    def __init__(self) -> None:
        super().__init__(tokens_per_s=50, default_tokens=60)
        self.consumer: Consumer | None = None
        self.held_at_shutdown: int | None = None

    async def shutdown(self) -> None:
        assert self.consumer is not None
        if self.held_at_shutdown is None:
            self.held_at_shutdown = self.consumer.inflight
        await super().shutdown()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        async for out in super().generate(request):
            if self.consumer is not None and not self.consumer.claiming:  # the stop began
                raise EngineStopped("vLLM's engine process is gone")
            yield out


async def test_a_stop_that_takes_the_engine_with_it_is_clean_and_hands_the_job_on(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    frontend = await stack.frontend()
    engine = DyingEngine()
    dying = await stack.worker(engine)
    engine.consumer = dying.consumer
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
        follower = Follower(channel, chat("stop cleanly"))
        await until(lambda: follower.deltas >= 2)
        await stack.worker(ScriptedEngine(tokens_per_s=500, default_tokens=60), lease_ms=600)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            await dying.stop(grace_s=30)
        stack.workers.remove(dying)
        await asyncio.wait_for(follower.done, 60)

    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert engine.held_at_shutdown == 0, "the engine was shut while the worker still held jobs"
    assert follower.events[-1].WhichOneof("event") == "finished"
    deltas = [e.delta.sequence for e in follower.events if e.WhichOneof("event") == "delta"]
    assert deltas == list(range(1, len(deltas) + 1))
    assert len(events_text(follower.events).split()) == 60
    assert dying.metrics is not None
    assert (
        dying.metrics.registry.get_sample_value(
            "mistral_serve_worker_jobs_total", {"outcome": "error", "code": "INTERNAL"}
        )
        is None
    )


async def test_the_deep_health_gauge_exists_only_with_deep_health_on(stack: Stack) -> None:
    off = await stack.worker()
    assert off.metrics is not None
    assert off.metrics.registry.get_sample_value("mistral_serve_worker_deep_health_ok") is None
    on = await stack.worker(deep_health_interval_s=0.05)
    assert on.metrics is not None
    await until(
        lambda: (
            on.metrics is not None
            and on.metrics.registry.get_sample_value("mistral_serve_worker_deep_health_ok") == 1
        )
    )
