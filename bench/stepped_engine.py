"""A fast engine for gateway benchmarks: batched steps at a fixed rate, like a continuous-batching engine.

One timer drives every running request: each step gives each of them one token (vLLM's shape: one
decode step, outputs for the whole batch at once). The first token is emitted at once (prefill costs
nothing here), so through-the-stack time to first token minus the direct one is the gateway's cost
alone. A request whose reader falls behind gets the tokens it missed merged into one output, as
vLLM's DELTA outputs do. Worker processes load it with
`MISTRAL_SERVE_ENGINE=bench.stepped_engine:from_env` (`STEPPED_TOKENS_PER_S`, `STEPPED_TOKENS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from mistral_serve.worker.engine import EngineOutput, EngineRequest

DEFAULT_TOKENS = 200


@dataclass(slots=True)
class _Running:
    due: int = 0  # tokens stepped but not yet taken
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class SteppedEngine:
    def __init__(self, *, tokens_per_s: float = 50.0, default_tokens: int = DEFAULT_TOKENS) -> None:
        self.interval_s = 1.0 / tokens_per_s
        self.default_tokens = default_tokens
        self._running: dict[str, _Running] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.steps = 0

    async def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def is_ready(self) -> bool:
        return self._ticker is not None

    def running_count(self) -> int:
        return len(self._running)

    async def abort(self, request_id: str) -> None:
        running = self._running.pop(request_id, None)
        if running is not None:
            running.wake.set()

    async def shutdown(self) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval_s
            # Steps keep their schedule; a late loop catches up rather than slowing the rate.
            await asyncio.sleep(max(next_at - loop.time(), 0.0))
            self.steps += 1
            for running in self._running.values():
                running.due += 1
                running.wake.set()

    def resumed_output(self, request: EngineRequest) -> EngineOutput:
        """The text of the tokens a resumed request already streamed (no tool calls: no marks)."""
        ids = tuple(request.resume_token_ids)
        return EngineOutput(text="".join(f" w{i}" for i in ids), token_ids=ids, prompt_tokens=0)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        sampling = request.chat.sampling
        total = sampling.max_tokens if sampling.HasField("max_tokens") else self.default_tokens
        prompt_tokens = sum(len(p.text.split()) for m in request.chat.messages for p in m.content)
        sent = len(request.resume_token_ids)
        running = _Running(due=1)  # the first token comes with the prefill, at once
        self._running[request.request_id] = running
        try:
            while sent < total:
                if not running.due:
                    running.wake.clear()
                    await running.wake.wait()
                    if request.request_id not in self._running:
                        return  # aborted
                    continue
                n = min(running.due, total - sent)
                running.due = 0
                ids = tuple(range(1000 + sent, 1000 + sent + n))
                sent += n
                yield EngineOutput(
                    text="".join(f" w{i}" for i in ids),
                    token_ids=ids,
                    prompt_tokens=prompt_tokens,
                    finish_reason="length" if sent >= total else None,
                )
        finally:
            self._running.pop(request.request_id, None)


def from_env() -> SteppedEngine:
    """Factory for `MISTRAL_SERVE_ENGINE=bench.stepped_engine:from_env` in worker processes."""
    return SteppedEngine(
        tokens_per_s=float(os.environ.get("STEPPED_TOKENS_PER_S", "50")),
        default_tokens=int(os.environ.get("STEPPED_TOKENS", str(DEFAULT_TOKENS))),
    )
