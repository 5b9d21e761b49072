"""ChatEvents in OpenAI's shapes: one `chat.completion`, or `chat.completion.chunk`s framed as SSE.

Each SSE event that a resume can start after carries `id: <request id>/<sequence>`: the first chunk
(sequence 0, the `started` event) and each delta's chunk. The closing chunks (finish reason, usage)
carry none, so a resume after the last delta gets them again, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from mistral_serve.v1 import chat_pb2

from .errors import code_name, from_error_event

FINISH_REASONS = {
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
    chat_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    chat_pb2.FINISH_REASON_ABORTED: "abort",  # vLLM's name for a request ended by a cancel
}
DONE = b"data: [DONE]\n\n"


def dumps(value: Any) -> bytes:
    # orjson: JSON was 3.1 of the 20.5 us of frontend CPU per streamed chunk (bench/http_chunk_cost.py).
    return orjson.dumps(value)


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def event_id(request_id: str, sequence: int) -> str:
    return f"{request_id}/{sequence}"


def parse_event_id(value: str) -> tuple[str, int] | None:
    """(request id, sequence) of a `Last-Event-ID`, or None when it is not one of ours."""
    request_id, _, sequence = value.strip().rpartition("/")
    if not request_id or not sequence.isdigit() or len(sequence) > 19:
        return None
    return request_id, int(sequence)


def usage(finished: chat_pb2.Finished) -> dict[str, int]:
    u = finished.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def tool_call(call: chat_pb2.FunctionCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }


# vLLM's floor for a logprob in JSON, which has no -Infinity.
LOGPROB_FLOOR = -9999.0


def _logprob_entry(token: str, logprob: float) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": max(logprob, LOGPROB_FLOOR),
        "bytes": list(token.encode("utf-8", errors="replace")),
    }


def logprobs(tokens: Sequence[chat_pb2.TokenLogprob]) -> dict[str, Any] | None:
    """OpenAI's `choices[0].logprobs`: one entry per token, with its most likely alternatives."""
    if not tokens:
        return None
    return {
        "content": [
            {
                **_logprob_entry(t.token, t.logprob),
                "top_logprobs": [_logprob_entry(a.token, a.logprob) for a in t.top_logprobs],
            }
            for t in tokens
        ]
    }


def stop_reason(finished: chat_pb2.Finished) -> str | None:
    """vLLM's `stop_reason` beside the finish reason: the stop sequence that matched, else null."""
    return finished.stop or None


def completion(
    request_id: str,
    model: str,
    created: int,
    text: str,
    finished: chat_pb2.Finished,
    token_logprobs: Sequence[chat_pb2.TokenLogprob] = (),
) -> dict[str, Any]:
    """The non-streaming answer: the whole text, the complete tool calls, the usage."""
    calls = [tool_call(c) for c in finished.tool_calls]
    return {
        "id": completion_id(request_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text or (None if calls else ""),
                    "tool_calls": calls,
                },
                "logprobs": logprobs(token_logprobs),
                "finish_reason": FINISH_REASONS.get(finished.finish_reason, "stop"),
                "stop_reason": stop_reason(finished),
            }
        ],
        "usage": usage(finished),
    }


@dataclass
class ChunkWriter:
    """Frames one stream's events as SSE; every chunk has the same `id`, `created` and `model`."""

    request_id: str
    model: str
    created: int
    include_usage: bool
    # The gRPC / google.rpc code name the stream ended with.
    outcome: str = "OK"
    _head: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self._head = {
            "id": completion_id(self.request_id),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }

    def started(self) -> bytes:
        return self._event({"role": "assistant", "content": ""}, sse_id=event_id(self.request_id, 0))

    def delta(self, delta: chat_pb2.Delta) -> bytes:
        body: dict[str, Any] = {}
        if delta.text:
            body["content"] = delta.text
        if delta.tool_calls:
            body["tool_calls"] = [_call_fragment(f) for f in delta.tool_calls]
        return self._event(
            body, sse_id=event_id(self.request_id, delta.sequence), token_logprobs=delta.logprobs
        )

    def finished(self, finished: chat_pb2.Finished) -> bytes:
        reason = FINISH_REASONS.get(finished.finish_reason, "stop")
        out = self._event({}, finish_reason=reason, stop=stop_reason(finished))
        if self.include_usage:
            out += _data({**self._head, "choices": [], "usage": usage(finished)})
        return out + DONE

    def error(self, error: chat_pb2.Error) -> bytes:
        """An error after the stream started: a last `data: {"error": ...}` event, then [DONE]."""
        self.outcome = code_name(error.code)
        return _data(from_error_event(error).body) + DONE

    def _event(
        self,
        delta: dict[str, Any],
        *,
        finish_reason: str | None = None,
        stop: str | None = None,
        sse_id: str = "",
        token_logprobs: Sequence[chat_pb2.TokenLogprob] = (),
    ) -> bytes:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": logprobs(token_logprobs),
            "finish_reason": finish_reason,
        }
        if finish_reason is not None:
            choice["stop_reason"] = stop
        chunk = {**self._head, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        framed = _data(chunk)
        return f"id: {sse_id}\n".encode() + framed if sse_id else framed


def _call_fragment(fragment: chat_pb2.FunctionCallDelta) -> dict[str, Any]:
    """OpenAI's tool-call delta: id, type and name in a call's first fragment, then arguments by index."""
    out: dict[str, Any] = {"index": fragment.index}
    function: dict[str, str] = {}
    if fragment.id:
        out["id"] = fragment.id
        out["type"] = "function"
        function["name"] = fragment.name
    if fragment.arguments_fragment or fragment.id:
        function["arguments"] = fragment.arguments_fragment
    out["function"] = function
    return out


def _data(value: Any) -> bytes:
    return b"data: " + dumps(value) + b"\n\n"
