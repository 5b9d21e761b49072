"""grpc.health.v1 for the worker: "" answers liveness; READINESS_SERVICE is SERVING only while the
engine is loaded and Redis answers, and NOT_SERVING again once the worker drains.

With a deep-check interval set, DEEP_SERVICE answers whether the last one-token generation on the
engine passed. It is a separate service, not part of readiness: under a full batch a deep check
waits its turn, and a slow engine should page someone rather than restart pods.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mistral_serve.common.redis_client import answers
from mistral_serve.v1 import chat_pb2

from .engine import Engine, EngineRequest

log = logging.getLogger(__name__)

READINESS_SERVICE = "mistral_serve.worker"
DEEP_SERVICE = "mistral_serve.worker.deep"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class WorkerHealth:
    def __init__(
        self,
        client: redis.Redis,
        engine: Engine,
        *,
        interval_s: float = 1.0,
        deep_timeout_s: float = 30.0,
        on_deep_check: Callable[[bool], None] | None = None,
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self._redis = client
        self._engine = engine
        self._interval_s = interval_s
        self._deep_timeout_s = deep_timeout_s
        self._on_deep_check = on_deep_check
        self._draining = False
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def serve(self, host: str, port: int) -> None:
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        await self.servicer.set("", SERVING)
        await self.servicer.set(READINESS_SERVICE, NOT_SERVING)
        await self.servicer.set(DEEP_SERVICE, NOT_SERVING)
        await self.server.start()

    async def run(self) -> None:
        while not self._draining:
            ready = self._engine.is_ready() and await answers(self._redis, self._interval_s)
            await self.servicer.set(READINESS_SERVICE, SERVING if ready else NOT_SERVING)
            await asyncio.sleep(self._interval_s)

    async def run_deep(self, interval_s: float) -> None:
        """Every `interval_s` once the engine is loaded: a one-token generation, reported as DEEP_SERVICE."""
        while not self._draining:
            if self._engine.is_ready():
                passed = await self.deep_check()
                if self._on_deep_check is not None:
                    self._on_deep_check(passed)
                if not self._draining:
                    await self.servicer.set(DEEP_SERVICE, SERVING if passed else NOT_SERVING)
            await asyncio.sleep(interval_s)

    async def deep_check(self) -> bool:
        """Whether the engine generates one token within the deep-check timeout."""
        request = EngineRequest(f"health-{uuid.uuid4().hex}", _deep_check_request())
        try:
            return await asyncio.wait_for(_first_token(self._engine, request), self._deep_timeout_s)
        except TimeoutError:
            log.warning("deep health: no token within %.1fs", self._deep_timeout_s)
        except Exception as exc:
            log.warning("deep health: the engine failed a one-token generation: %s", exc)
        return False

    async def drain(self) -> None:
        self._draining = True
        await self.servicer.set(READINESS_SERVICE, NOT_SERVING)
        await self.servicer.set(DEEP_SERVICE, NOT_SERVING)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


def _deep_check_request() -> chat_pb2.ChatRequest:
    request = chat_pb2.ChatRequest(
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text="ping")])]
    )
    request.sampling.max_tokens = 1
    request.sampling.temperature = 0.0
    return request


async def _first_token(engine: Engine, request: EngineRequest) -> bool:
    outputs = engine.generate(request)
    try:
        async for out in outputs:
            if out.token_ids:
                return True
            if out.finish_reason is not None:
                break
        return False
    finally:
        close = getattr(outputs, "aclose", None)
        if close is not None:
            await close()  # ends the request in the engine at once, not when the generator is collected
