"""The `Engine` protocol: the one interface between the queue consumer and a model runtime."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mistral_serve.v1 import chat_pb2

EngineFinishReason = Literal["stop", "length", "abort"]


class EngineRequestError(Exception):
    """The request cannot run on this engine (the caller's fault, e.g. over the context length)."""


class EngineStopped(Exception):
    """The engine went away under a request (it was shut down, or its process died)."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    chat: chat_pb2.ChatRequest
    # Tokens this request already streamed on an earlier attempt; generation continues after them.
    resume_token_ids: tuple[int, ...] = field(default=())
    # The prompt's ids as the front door encoded them, by the builder of fingerprint
    # `prompt_fingerprint`: an engine whose builder has the same one runs them as the prompt.
    prompt_token_ids: Sequence[int] = field(default=())
    prompt_fingerprint: str = ""


class Marker(enum.Enum):
    """The special tokens of the model's tool-call format: `[TOOL_CALLS]name[CALL_ID]id[ARGS]{json}`."""

    TOOL_CALLS = "[TOOL_CALLS]"
    ARGS = "[ARGS]"
    CALL_ID = "[CALL_ID]"


@dataclass(frozen=True, slots=True)
class TokenMark:
    """Where a tool-call special token sits in an output's text: `text[start:end]` is what the
    detokenizer wrote for it (its name, or nothing). Text outside marks is ordinary tokens' text,
    even where it spells a marker's name."""

    marker: Marker
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """What one engine step produced for one request: only what is new since the last output."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    image_tokens: int = 0
    # Set on the last output of a request, None before.
    finish_reason: EngineFinishReason | None = None
    # With SamplingParams.logprobs: one per token of `token_ids`.
    logprobs: tuple[chat_pb2.TokenLogprob, ...] = ()
    # On the last output: the stop sequence that ended it, None when none did.
    stop: str | None = None
    # The tool-call special tokens in `text`, found by token id, in order.
    marks: tuple[TokenMark, ...] = ()


class Engine(Protocol):
    async def start(self) -> None:
        """Load the model; return once the engine can generate."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream the outputs of one request. Cancelling the consumer aborts the request."""

    def resumed_output(self, request: EngineRequest) -> EngineOutput:
        """The text and marks of `request.resume_token_ids`, as `generate` streamed them: what brings a
        resumed request's tool-call parser back to its state."""

    async def abort(self, request_id: str) -> None:
        """End a request and free its resources. Idempotent; unknown ids are ignored."""

    def is_ready(self) -> bool:
        """True once loaded and able to generate."""

    def running_count(self) -> int:
        """Requests the engine holds right now (running or waiting inside the engine)."""

    async def shutdown(self) -> None:
        """Stop the engine and free its resources."""
