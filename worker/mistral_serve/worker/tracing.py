"""A job's spans and metrics: the CONSUMER span (its parent the frontend's PRODUCER span, from the
queued `traceparent`) and under it the generation span `chat {model}` with the OpenTelemetry
`gen_ai.*` attributes and the events "queued", "started" and "first token".

The worker's telemetry (tracer, metrics, settings) is built once by `app.start_worker` and handed to
the consumer, which passes it to each run. Message contents are recorded only when `trace_content` is on.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextvars import Token
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from mistral_serve.common import keys, sampling
from mistral_serve.common.contract import DEFAULT_MODEL, finish_reason_name
from mistral_serve.common.logs import bind_request_id
from mistral_serve.common.tracecontext import extract_from
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

from .metrics import OPERATION, PROVIDER, WorkerMetrics

ROLES = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
    chat_pb2.ROLE_TOOL: "tool",
}


@dataclass
class WorkerTelemetry:
    tracer: trace.Tracer
    metrics: WorkerMetrics
    # The served model's name (SharedSettings.served_model_name), never a local path.
    model: str = DEFAULT_MODEL
    pool: str = "default"
    # Record prompt and output text on generation spans (opt-in).
    trace_content: bool = False


def _ns(unix_s: float) -> int:
    return int(unix_s * 1e9)


class JobObservation:
    """Spans and metrics of one run of a job on the engine; a context manager around the run."""

    def __init__(
        self,
        queued: queue_pb2.QueuedRequest,
        telemetry: WorkerTelemetry,
        *,
        attempt: int,
        resumed_tokens: int | None,
    ) -> None:
        self._t = telemetry
        self._queued = queued
        # Which run of the job this is: 1, then one more for each worker lost (or drained) under it.
        self._attempt = attempt
        # None for a first run; the tokens an earlier run streamed for a resumed one.
        self._resumed_tokens = resumed_tokens
        self.started_at = time.time()
        self.first_token_at: float | None = None
        # Output text gathered for the span, only when contents are recorded.
        self.output: list[str] | None = [] if self._t.trace_content else None
        self._consumer: Span = trace.INVALID_SPAN
        self._generation: Span = trace.INVALID_SPAN
        self._token: Token[otel_context.Context] | None = None

    def __enter__(self) -> JobObservation:
        queued, t = self._queued, self._t
        bind_request_id(queued.request_id)
        stream = keys.request_stream(t.pool, keys.band_of(queued.request.priority))
        self._consumer = t.tracer.start_span(
            f"process {stream}",
            context=extract_from(queued),
            kind=SpanKind.CONSUMER,
            start_time=_ns(self.started_at),
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": stream,
                "messaging.consumer.group.name": keys.WORKER_GROUP,
                "mistral_serve.request_id": queued.request_id,
                "mistral_serve.resumed": self._resumed_tokens is not None,
            },
        )
        self._generation = t.tracer.start_span(
            f"chat {t.model}",
            context=trace.set_span_in_context(self._consumer),
            kind=SpanKind.INTERNAL,
            start_time=_ns(self.started_at),
            attributes=self._request_attributes(),
        )
        self._add_start_events()
        self._token = otel_context.attach(trace.set_span_in_context(self._generation))
        m = t.metrics
        if self._resumed_tokens is None:
            m.queue_time.observe(max(self.started_at - queued.admitted_unix, 0.0))
        else:
            m.resumes.inc()
        m.waiting.inc()
        return self

    def _request_attributes(self) -> dict[str, Any]:
        request = self._queued.request
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": self._t.model,
            "gen_ai.response.id": self._queued.request_id,
            **sampling.span_attributes(request.sampling),
        }
        if self._t.trace_content:
            attributes["gen_ai.input.messages"] = json.dumps(input_messages(request))
        return attributes

    def _add_start_events(self) -> None:
        admitted = self._queued.admitted_unix
        wait = max(self.started_at - admitted, 0.0)
        self._generation.add_event(
            "queued", {"mistral_serve.queue.wait_seconds": wait}, timestamp=_ns(admitted or self.started_at)
        )
        started: dict[str, Any] = {"mistral_serve.attempt": self._attempt}
        if self._resumed_tokens is not None:
            started["mistral_serve.resumed_tokens"] = self._resumed_tokens
        self._generation.add_event("started", started, timestamp=_ns(self.started_at))

    def first_token(self) -> None:
        """Called once, when the engine produced this run's first token."""
        self.first_token_at = now = time.time()
        self._generation.add_event("first token", timestamp=_ns(now))
        m = self._t.metrics
        m.waiting.dec()
        m.running.inc()
        if self._resumed_tokens is None:
            m.gen_ai(m.time_to_first_token).observe(max(now - self._queued.admitted_unix, 0.0))

    def finished(self, finished: chat_pb2.Finished) -> None:
        """Record the run's result: finish reason, usage, time per output token."""
        usage, span, m = finished.usage, self._generation, self._t.metrics
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason_name(finished.finish_reason)])
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
        if self.output is not None:
            span.set_attribute("gen_ai.output.messages", json.dumps(output_messages(self.output, finished)))
        generated = usage.completion_tokens - (self._resumed_tokens or 0)
        m.count_tokens(usage.prompt_tokens, max(generated, 0))
        if self.first_token_at is not None and generated > 1:
            decode_s = time.time() - self.first_token_at
            m.gen_ai(m.time_per_output_token).observe(decode_s / (generated - 1))
        if finished.finish_reason == chat_pb2.FINISH_REASON_ABORTED:
            self._fail("abort", "the engine aborted the request")

    def _fail(self, error_type: str, message: str) -> None:
        for span in (self._generation, self._consumer):
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, message))

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        m = self._t.metrics
        error_type = ""
        if isinstance(exc, asyncio.CancelledError):
            error_type = "cancelled"
            self._fail(error_type, "the run was stopped: cancel, deadline, detach, lease lost or drain")
        elif exc is not None:
            error_type = type(exc).__qualname__
            self._generation.record_exception(exc)
            self._fail(error_type, str(exc))
        (m.waiting if self.first_token_at is None else m.running).dec()
        m.duration(error_type).observe(max(time.time() - self._queued.admitted_unix, 0.0))
        if self._token is not None:
            otel_context.detach(self._token)
        self._generation.end()
        self._consumer.end()


def input_messages(request: chat_pb2.ChatRequest) -> list[dict[str, Any]]:
    """The prompt as gen_ai.input.messages: roles and text; images by kind only, never their bytes."""
    messages = []
    for message in request.messages:
        parts: list[dict[str, Any]] = []
        for part in message.content:
            kind = part.WhichOneof("kind")
            if kind == "text":
                parts.append({"type": "text", "content": part.text})
            elif kind is not None:
                parts.append({"type": "blob", "modality": "image"})
        messages.append({"role": ROLES.get(message.role, "user"), "parts": parts})
    return messages


def output_messages(text: list[str], finished: chat_pb2.Finished) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "content": "".join(text)}]
    for call in finished.tool_calls:
        parts.append(
            {"type": "tool_call", "id": call.id, "name": call.name, "arguments": call.arguments_json}
        )
    return [
        {"role": "assistant", "parts": parts, "finish_reason": finish_reason_name(finished.finish_reason)}
    ]
