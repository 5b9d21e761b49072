"""grpc.health.v1 for the worker: "" answers liveness; READINESS_SERVICE is SERVING only while the
engine is loaded and Redis answers, and NOT_SERVING again once the worker drains."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import cast

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.exceptions import RedisError

from .engine import Engine

log = logging.getLogger(__name__)

READINESS_SERVICE = "mistral_serve.worker"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class WorkerHealth:
    def __init__(self, client: redis.Redis, engine: Engine, *, interval_s: float = 1.0) -> None:
        self.servicer = health.aio.HealthServicer()
        self._redis = client
        self._engine = engine
        self._interval_s = interval_s
        self._draining = False
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def serve(self, host: str, port: int) -> None:
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        await self.servicer.set("", SERVING)
        await self.servicer.set(READINESS_SERVICE, NOT_SERVING)
        await self.server.start()

    async def run(self) -> None:
        while not self._draining:
            ready = self._engine.is_ready() and await self._redis_answers()
            await self.servicer.set(READINESS_SERVICE, SERVING if ready else NOT_SERVING)
            await asyncio.sleep(self._interval_s)

    async def drain(self) -> None:
        self._draining = True
        await self.servicer.set(READINESS_SERVICE, NOT_SERVING)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    async def _redis_answers(self) -> bool:
        try:
            return bool(await asyncio.wait_for(_ping(self._redis), timeout=self._interval_s))
        except (RedisError, TimeoutError, OSError) as exc:
            log.warning("readiness: Redis does not answer: %s", exc)
            return False


async def _ping(client: redis.Redis) -> bool:
    # redis-py types ping() as sync-or-async; on the asyncio client it is always awaitable.
    return bool(await cast("Awaitable[bool]", client.ping()))
