"""Assembles a worker (Redis, engine, event writer, consumer, health) and runs it until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
from dataclasses import dataclass

import redis.asyncio as redis

from mistral_serve.common.redis_client import connect

from .consumer import Consumer
from .engine import Engine
from .events import EventWriter
from .health import WorkerHealth
from .settings import WorkerSettings

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

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: stop claiming, give running jobs `grace_s`, leave the rest unacked."""
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


async def start_worker(settings: WorkerSettings, engine: Engine) -> Worker:
    client = connect(settings.redis_url, settings.redis_password, max_connections=settings.max_inflight + 8)
    health = WorkerHealth(client, engine)
    await health.serve(settings.health_host, settings.health_port)
    loop = asyncio.get_running_loop()
    health_task = loop.create_task(health.run())
    await engine.start()
    writer = EventWriter(
        client,
        ttl_s=settings.event_ttl_s,
        interval_s=settings.flush_interval_ms / 1000,
        max_events=settings.flush_max_events,
    )
    consumer = Consumer(
        client,
        engine,
        writer,
        pool=settings.pool,
        consumer_name=settings.consumer_name,
        max_inflight=settings.max_inflight,
        block_ms=settings.block_ms,
        lease_ms=settings.lease_ms,
        max_attempts=settings.max_attempts,
    )
    await consumer.ensure_group()
    tasks = [
        health_task,
        loop.create_task(writer.run()),
        loop.create_task(consumer.listen_for_cancels()),
        loop.create_task(consumer.run()),
        loop.create_task(consumer.run_leases()),
    ]
    log.info(
        "worker %s serving pool %s, %d jobs at once",
        settings.consumer_name,
        settings.pool,
        settings.max_inflight,
    )
    return Worker(settings, client, engine, consumer, writer, health, tasks)


async def serve(settings: WorkerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = await start_worker(settings, load_engine(settings.engine))
    await stop.wait()
    log.info("draining: in-flight jobs get %.0fs", settings.drain_grace_s)
    await worker.stop()
