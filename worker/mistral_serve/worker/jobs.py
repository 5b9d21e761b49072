"""Runs one queued request on the engine and turns its outputs into ChatEvents."""

from __future__ import annotations

import time

from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

from .engine import Engine, EngineFinishReason, EngineRequest
from .events import EventWriter
from .tool_calls import ToolCallStreamParser

_FINISH_REASONS: dict[EngineFinishReason, chat_pb2.FinishReason.ValueType] = {
    "stop": chat_pb2.FINISH_REASON_STOP,
    "length": chat_pb2.FINISH_REASON_LENGTH,
    "abort": chat_pb2.FINISH_REASON_ABORTED,
}


async def generate_events(
    engine: Engine, writer: EventWriter, queued: queue_pb2.QueuedRequest
) -> chat_pb2.ChatEvent:
    """Stream `queued`'s deltas through `writer`; return the `finished` event (not yet written)."""
    request_id = queued.request_id
    started_at = time.time()
    parser = ToolCallStreamParser()
    sequence = 0
    unsent_tokens = 0
    usage = chat_pb2.Usage()
    first_token_at: float | None = None
    reason: EngineFinishReason = "stop"

    def emit(text: str, calls: list[chat_pb2.FunctionCallDelta]) -> None:
        nonlocal sequence, unsent_tokens
        sequence += 1
        delta = chat_pb2.Delta(sequence=sequence, text=text, tool_calls=calls, token_count=unsent_tokens)
        unsent_tokens = 0
        writer.emit(request_id, chat_pb2.ChatEvent(delta=delta), urgent=sequence == 1)

    async for out in engine.generate(EngineRequest(request_id, queued.request)):
        usage.prompt_tokens = out.prompt_tokens
        usage.image_tokens = out.image_tokens
        usage.completion_tokens += len(out.token_ids)
        unsent_tokens += len(out.token_ids)
        if first_token_at is None and out.token_ids:
            first_token_at = time.time()
        text, calls = parser.feed(out.text)
        if text or calls:
            emit(text, calls)
        if out.finish_reason is not None:
            reason = out.finish_reason
    tail, tool_calls = parser.finish()
    if tail:
        emit(tail, [])
    finish_reason = _FINISH_REASONS[reason]
    if tool_calls and reason == "stop":
        finish_reason = chat_pb2.FINISH_REASON_TOOL_CALLS
    end = time.time()
    admitted = queued.admitted_unix
    return chat_pb2.ChatEvent(
        finished=chat_pb2.Finished(
            finish_reason=finish_reason,
            tool_calls=tool_calls,
            usage=usage,
            timings=chat_pb2.Timings(
                queue_seconds=max(started_at - admitted, 0.0),
                time_to_first_token_seconds=max((first_token_at or end) - admitted, 0.0),
                total_seconds=max(end - admitted, 0.0),
            ),
        )
    )


def error_event(code: int, message: str, *, retryable: bool = False) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(error=chat_pb2.Error(code=code, message=message, retryable=retryable))
