"""The session's `VllmEngine` lent to an in-process worker: the worker's stop must not shut it down."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mistral_serve.frontend.server import Frontend, start_frontend
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.worker.app import start_worker
from mistral_serve.worker.engine import EngineOutput, EngineRequest
from mistral_serve.worker.settings import WorkerSettings
from mistral_serve.worker.vllm_engine import VllmEngine


class SessionEngine:
    """The session's VllmEngine, lent to one worker: the worker's stop must not shut it down."""

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine

    async def start(self) -> None:
        await self._engine.start()

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        return self._engine.generate(request)

    def resumed_output(self, request: EngineRequest) -> EngineOutput:
        return self._engine.resumed_output(request)

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    def is_ready(self) -> bool:
        return self._engine.is_ready()

    def running_count(self) -> int:
        return self._engine.running_count()

    async def shutdown(self) -> None:
        """Left to the session fixture."""


@contextlib.asynccontextmanager
async def session_stack(engine: VllmEngine, redis_url: str) -> AsyncIterator[Frontend]:
    """An in-process frontend and worker on loopback ports, the worker on the session's engine."""
    frontend = await start_frontend(
        FrontendSettings(redis_url=redis_url, grpc_host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=0)
    )
    worker = await start_worker(
        WorkerSettings(redis_url=redis_url, health_host="127.0.0.1", health_port=0, metrics_port=0),
        SessionEngine(engine),
    )
    try:
        yield frontend
    finally:
        await worker.stop(grace_s=0)
        await frontend.stop(grace_s=0)
