"""Builds the frontend's grpc.aio server and runs it until SIGTERM, then drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mistral_serve.common.redis_client import connect
from mistral_serve.v1 import chat_pb2_grpc

from .fanout import EventFanout
from .health import READINESS_SERVICE, FrontendHealth
from .queue import RequestQueue
from .servicer import ChatServicer, TokenCounter
from .settings import FrontendSettings

log = logging.getLogger(__name__)


@dataclass
class Frontend:
    """A started frontend: its server, the port it listens on, and its background tasks."""

    settings: FrontendSettings
    server: grpc.aio.Server
    port: int
    redis: redis.Redis
    health: FrontendHealth
    fanout: EventFanout
    tasks: list[asyncio.Task[None]]

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: readiness NOT_SERVING, no new RPCs, open streams get `grace_s` to finish."""
        await self.health.drain()
        await self.server.stop(self.settings.drain_grace_s if grace_s is None else grace_s)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.redis.aclose()


async def start_frontend(settings: FrontendSettings, token_counter: TokenCounter | None = None) -> Frontend:
    client = connect(settings.redis_url, settings.redis_password)
    fanout = EventFanout(client, settings.instance_id)
    queue = RequestQueue(
        client,
        pool=settings.pool,
        max_backlog=settings.max_backlog,
        retry_after_s=settings.retry_after_s,
        frontend_id=settings.instance_id,
        cancel_ttl_s=settings.event_ttl_s,
    )
    health = FrontendHealth(client, settings.health_interval_s)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    chat_pb2_grpc.add_ChatServiceServicer_to_server(
        ChatServicer(settings, queue, fanout, token_counter), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        [
            READINESS_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    await health.start()
    await server.start()
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(fanout.run()), loop.create_task(health.run())]
    log.info("frontend %s listening on port %d (pool %s)", settings.instance_id, port, settings.pool)
    return Frontend(settings, server, port, client, health, fanout, tasks)


async def serve(settings: FrontendSettings, token_counter: TokenCounter | None = None) -> None:
    frontend = await start_frontend(settings, token_counter)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: open streams get %.0fs", settings.drain_grace_s)
    await frontend.stop()
