"""The real `VllmEngine`, pacing its outputs: a worker process that a test kills mid-call must still be
in the call when the kill lands, and the tiny model on a CPU writes a whole call in well under a
second. Only the pace between outputs differs; the tokens are vLLM's."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from mistral_serve.worker.engine import EngineOutput, EngineRequest
from mistral_serve.worker.vllm_engine import VllmEngine, VllmEngineSettings


class PacedEngine(VllmEngine):
    def __init__(self, settings: VllmEngineSettings, pace_s: float) -> None:
        super().__init__(settings)
        self.pace_s = pace_s

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        async for out in super().generate(request):
            yield out
            await asyncio.sleep(self.pace_s)


def from_env() -> PacedEngine:
    """Factory for `MISTRAL_SERVE_ENGINE=tests.engine.paced_engine:from_env` (pace: PACED_ENGINE_S)."""
    return PacedEngine(VllmEngineSettings.from_env(), float(os.environ.get("PACED_ENGINE_S", "0.5")))
