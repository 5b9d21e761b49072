"""grpc.health.v1 for the frontend: "" answers liveness, the ChatService name answers readiness."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2

from mistral_serve.common.redis_client import answers
from mistral_serve.v1 import chat_pb2

log = logging.getLogger(__name__)

READINESS_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FrontendHealth:
    def __init__(self, client: redis.Redis, interval_s: float) -> None:
        self.servicer = health.aio.HealthServicer()
        self._redis = client
        self._interval_s = interval_s
        self._draining = False
        # Readiness as last checked, for the HTTP door's probe.
        self.ready = False

    async def start(self) -> None:
        await self.servicer.set("", SERVING)
        await self.servicer.set(READINESS_SERVICE, NOT_SERVING)

    async def run(self) -> None:
        """Keep readiness in step with Redis: SERVING only while it answers."""
        while not self._draining:
            ready = await answers(self._redis, self._interval_s)
            self.ready = ready and not self._draining
            await self.servicer.set(READINESS_SERVICE, SERVING if ready else NOT_SERVING)
            await asyncio.sleep(self._interval_s)

    async def drain(self) -> None:
        self._draining = True
        self.ready = False
        await self.servicer.enter_graceful_shutdown()
