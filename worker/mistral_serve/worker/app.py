"""Assembles a worker (Redis, engine, event writer, consumer, health) and runs it until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
from dataclasses import dataclass

import redis.asyncio as redis
from opentelemetry import trace

from mistral_serve.common import keys
from mistral_serve.common.epoch import RedisEpoch
from mistral_serve.common.ports import report_ports
from mistral_serve.common.redis_client import connect, refuse_evicting_redis
from mistral_serve.common.telemetry import MetricsServer, get_tracer, serve_metrics

from . import watchers
from .consumer import Consumer
from .engine import Engine
from .events import EventWriter
from .health import WorkerHealth
from .metrics import WorkerMetrics
from .restarts import RestartGuard, watch_restarts
from .settings import WorkerSettings
from .tracing import WorkerTelemetry

log = logging.getLogger(__name__)


def load_engine(spec: str) -> Engine:
    """The engine a worker runs: "vllm", or "module:factory" naming a callable that returns one."""
    if spec == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine.from_env()
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"MISTRAL_SERVE_ENGINE={spec!r}: expected 'vllm' or 'module:factory'")
    factory = getattr(importlib.import_module(module_name), attr)
    engine: Engine = factory()
    return engine


@dataclass
class Worker:
    settings: WorkerSettings
    redis: redis.Redis
    engine: Engine
    consumer: Consumer
    writer: EventWriter
    health: WorkerHealth
    tasks: list[asyncio.Task[None]]
    metrics: WorkerMetrics | None = None
    # The /metrics endpoint, when a metrics port is set; its port is the one bound (for port 0).
    metrics_server: MetricsServer | None = None

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, in this order: stop claiming, give running jobs `grace_s` and leave the rest unacked
        for other workers, stop the loops around them, and only then shut the engine."""
        self.consumer.stop_claiming()
        await self.health.drain()
        await self.consumer.drain(self.settings.drain_grace_s if grace_s is None else grace_s)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.health.stop()
        await self.engine.shutdown()
        await self.redis.aclose()
        if self.metrics_server is not None:
            self.metrics_server.stop()


async def start_worker(
    settings: WorkerSettings, engine: Engine, *, tracer_provider: trace.TracerProvider | None = None
) -> Worker:
    """Start a worker; spans go to `tracer_provider` (tests), else to the process's global provider."""
    client = connect(settings.redis_connection, max_connections=settings.max_inflight + 8)
    await refuse_evicting_redis(client)
    deep_health = settings.deep_health_interval_s > 0
    metrics = WorkerMetrics(settings.served_model_name, deep_health=deep_health)
    health = WorkerHealth(
        client,
        engine,
        deep_timeout_s=settings.deep_health_timeout_s,
        on_deep_check=metrics.deep_check_done,
    )
    await health.serve(settings.health_host, settings.health_port)
    loop = asyncio.get_running_loop()
    health_task = loop.create_task(health.run())
    await engine.start()
    writer = EventWriter(
        client,
        pool=settings.pool,
        replica_wait=settings.replica_wait,
        ttl_s=settings.event_ttl_s,
        interval_s=settings.flush_interval_ms / 1000,
        max_events=settings.flush_max_events,
    )
    telemetry = WorkerTelemetry(
        get_tracer(tracer_provider),
        metrics,
        model=settings.served_model_name,
        pool=settings.pool,
        trace_content=settings.trace_content,
    )
    consumer = Consumer(
        client,
        engine,
        writer,
        telemetry,
        pool=settings.pool,
        consumer_name=settings.consumer_name,
        max_inflight=settings.max_inflight,
        block_ms=settings.block_ms,
        lease_ms=settings.lease_ms,
        max_attempts=settings.max_attempts,
        fair_quantum_tokens=settings.fair_quantum_tokens,
    )
    await consumer.ensure_group()
    epoch = RedisEpoch(client, settings.pool)
    await epoch.data_lost()  # the epoch this worker starts in
    guard = RestartGuard(epoch, writer, consumer, consumer.ensure_group)
    metrics.inflight.set_function(lambda: consumer.inflight)
    tasks = [
        health_task,
        loop.create_task(writer.run()),
        loop.create_task(consumer.run()),
        loop.create_task(watchers.listen_for_cancels(client, keys.cancel_channel(settings.pool), consumer)),
        loop.create_task(watchers.keep_leases(consumer.leases, consumer, consumer.streams, guard.check)),
        loop.create_task(
            watchers.watch_attachments(
                client,
                consumer,
                settings.pool,
                settings.attach_check_interval_s,
                renewal_s=settings.detach_grace_s / 3,
            )
        ),
        loop.create_task(watch_restarts(guard, settings.restart_check_interval_s)),
    ]
    if deep_health:
        tasks.append(loop.create_task(health.run_deep(settings.deep_health_interval_s)))
    metrics_server = None
    if settings.metrics_port is not None:
        metrics_server = serve_metrics(metrics.registry, settings.metrics_host, settings.metrics_port)
    log.info(
        "worker %s serving pool %s, %d jobs at once",
        settings.consumer_name,
        settings.pool,
        settings.max_inflight,
    )
    return Worker(settings, client, engine, consumer, writer, health, tasks, metrics, metrics_server)


async def serve(settings: WorkerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = await start_worker(settings, load_engine(settings.engine))
    report_ports(health=worker.health.port, metrics=worker.metrics_port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        # At once, not after the loop gets to it: Ctrl-C reaches vLLM's engine process too, which
        # may be gone before the drain starts; jobs that see it go must know the worker is stopping.
        loop.add_signal_handler(sig, _stop_now, worker, stop)
    if stop.is_set():
        worker.consumer.stop_claiming()
    await stop.wait()
    log.info("draining: in-flight jobs get %.0fs", settings.drain_grace_s)
    await worker.stop()
    log.info("worker %s stopped", settings.consumer_name)


def _stop_now(worker: Worker, stop: asyncio.Event) -> None:
    worker.consumer.stop_claiming()
    stop.set()
