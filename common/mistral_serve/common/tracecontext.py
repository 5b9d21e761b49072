"""W3C trace context across the queue: the producer injects it into the queued request, the consumer
extracts it, and gRPC metadata carries the caller's. The propagator is the global one
(`OTEL_PROPAGATORS`, W3C trace context and baggage by default)."""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import propagate
from opentelemetry.context import Context

from mistral_serve.queue.v1 import queue_pb2

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


def inject_into(queued: queue_pb2.QueuedRequest, context: Context | None = None) -> None:
    """Write the current (or `context`'s) span context into `queued.traceparent`/`tracestate`."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    queued.traceparent = carrier.get(TRACEPARENT, "")
    queued.tracestate = carrier.get(TRACESTATE, "")


def extract_from(queued: queue_pb2.QueuedRequest) -> Context:
    """The context whose span is the producer's, to parent the consumer's span (empty when none)."""
    carrier = {TRACEPARENT: queued.traceparent}
    if queued.tracestate:
        carrier[TRACESTATE] = queued.tracestate
    return propagate.extract(carrier) if queued.traceparent else Context()


def extract_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The caller's context from gRPC invocation metadata (text headers only)."""
    carrier = {
        key.lower(): value
        for key, value in metadata or ()
        if isinstance(value, str) and key.lower() in (TRACEPARENT, TRACESTATE)
    }
    return propagate.extract(carrier) if carrier else Context()
