"""A deterministic engine for tests: emits a scripted token sequence at a set rate.

The text depends only on the request (its last message and max_tokens), so the same request gives
the same text on any worker. It records what reached it, so tests can see aborts and skips.

Its "tokenizer" reads the names of the tool-call special tokens in a word as those tokens (`marks`):
a prompt that says `[TOOL_CALLS]f[ARGS]{}` gets a call, as a model writing those tokens would.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
from collections.abc import AsyncIterator

from mistral_serve.worker.engine import (
    EngineFinishReason,
    EngineOutput,
    EngineRequest,
    EngineRequestError,
    Marker,
    TokenMark,
)

DEFAULT_TOKENS = 12


class ScriptedEngine:
    def __init__(self, *, tokens_per_s: float = 2000.0, default_tokens: int = DEFAULT_TOKENS) -> None:
        self.interval_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self.default_tokens = default_tokens
        self.started_ids: list[str] = []
        self.requests: list[EngineRequest] = []  # every request that reached generate, as it came
        self.aborted_ids: list[str] = []
        # Tokens generated so far, by request id: what tests wait on to see a request go on.
        self.emitted: collections.Counter[str] = collections.Counter()
        self._running: set[str] = set()
        self._ready = False

    async def start(self) -> None:
        self._ready = True

    def is_ready(self) -> bool:
        return self._ready

    def running_count(self) -> int:
        return len(self._running)

    def resumed_output(self, request: EngineRequest) -> EngineOutput:
        words, _ = script_for(request, self.default_tokens)
        text = "".join(spaced(words, i) for i in range(min(len(words), len(request.resume_token_ids))))
        return EngineOutput(text, request.resume_token_ids, 0, marks=marks(text))

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:
            self.aborted_ids.append(request_id)
            self._running.discard(request_id)

    async def shutdown(self) -> None:
        self._ready = False

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.requests.append(request)
        words, reason = script_for(request, self.default_tokens)
        if words and words[0] == "[fail]":
            raise EngineRequestError("the scripted engine refuses this prompt")
        self.started_ids.append(request.request_id)
        self._running.add(request.request_id)
        prompt_tokens = sum(len(part.text.split()) for m in request.chat.messages for part in m.content)
        try:
            # A resumed request continues after the tokens it already streamed.
            for i in range(len(words)):
                if i < len(request.resume_token_ids):
                    continue
                if self.interval_s:
                    await asyncio.sleep(self.interval_s)
                if request.request_id not in self._running:
                    return
                last = i == len(words) - 1
                self.emitted[request.request_id] += 1
                text = spaced(words, i)
                yield EngineOutput(
                    text=text,
                    token_ids=(1000 + i,),
                    prompt_tokens=prompt_tokens,
                    finish_reason=reason if last else None,
                    marks=marks(text),
                )
        except (asyncio.CancelledError, GeneratorExit):
            await self.abort(request.request_id)
            raise
        finally:
            self._running.discard(request.request_id)


_MARKER_RE = re.compile("|".join(re.escape(m.value) for m in Marker))


def marks(text: str) -> tuple[TokenMark, ...]:
    """Every marker name in `text` read as its special token: a model's output written as text."""
    return tuple(TokenMark(Marker(m.group()), m.start(), m.end()) for m in _MARKER_RE.finditer(text))


def spaced(words: list[str], i: int) -> str:
    """Word `i` as the engine streams it: after a blank, but for the first."""
    return words[i] if i == 0 else " " + words[i]


def script_for(
    request: EngineRequest, natural_length: int = DEFAULT_TOKENS
) -> tuple[list[str], EngineFinishReason]:
    """The words a request gets: the last message's words, then w1, w2... `natural_length` words in
    all ("stop"), or fewer when max_tokens cuts them short ("length")."""
    last = request.chat.messages[-1]
    words = " ".join(part.text for part in last.content if part.WhichOneof("kind") == "text").split()
    words = (words + [f"w{i}" for i in range(1, natural_length + 1)])[:natural_length]
    sampling = request.chat.sampling
    if sampling.HasField("max_tokens") and sampling.max_tokens < len(words):
        return words[: sampling.max_tokens], "length"
    return words, "stop"


def from_env() -> ScriptedEngine:
    """Factory for `MISTRAL_SERVE_ENGINE=tests.support.scripted_engine:from_env` in worker processes."""
    return ScriptedEngine(
        tokens_per_s=float(os.environ.get("SCRIPTED_TOKENS_PER_S", "2000")),
        default_tokens=int(os.environ.get("SCRIPTED_TOKENS", str(DEFAULT_TOKENS))),
    )
