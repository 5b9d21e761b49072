"""The session's `VllmEngine` lent to an in-process worker: the worker's stop must not shut it down."""

from __future__ import annotations

from collections.abc import AsyncIterator

from mistral_serve.worker.engine import EngineOutput, EngineRequest
from mistral_serve.worker.vllm_engine import VllmEngine


class SessionEngine:
    """The session's VllmEngine, lent to one worker: the worker's stop must not shut it down."""

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine

    async def start(self) -> None:
        await self._engine.start()

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        return self._engine.generate(request)

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    def is_ready(self) -> bool:
        return self._engine.is_ready()

    def running_count(self) -> int:
        return self._engine.running_count()

    async def shutdown(self) -> None:
        """Left to the session fixture."""
