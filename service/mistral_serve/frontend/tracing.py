"""The frontend's SERVER span and request metrics, by one interceptor around every RPC.

It follows opentelemetry-python-contrib's grpc.aio server interceptor (`_aio_server.py`): the span is
named after the full method, has kind SERVER, `rpc.*` attributes and a status from the gRPC code, and
its parent is the caller's `traceparent` from the call's metadata. Unlike the contrib one it reads the
final code from the servicer context, so statuses set through `abort_with_status` (all of this
service's errors) are seen, and it knows ChatEvent streams: a stream that ends in an `error` event
counts as failed with that event's code, and the first delta gives the time to first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from mistral_serve.common.contract import code_name
from mistral_serve.common.tracecontext import extract_from_metadata
from mistral_serve.v1 import chat_pb2

from .gating import Context
from .metrics import FrontendMetrics

RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
ERROR_TYPE = "error.type"
REQUEST_ID = "mistral_serve.request_id"
# The metrics label of this door (the HTTP door counts as "http").
DOOR = "grpc"


class ServerTelemetry(grpc.aio.ServerInterceptor):
    def __init__(
        self, tracer: trace.Tracer, metrics: FrontendMetrics, *, excluded_prefixes: tuple[str, ...] = ()
    ) -> None:
        self.tracer = tracer
        self.metrics = metrics
        self._excluded = excluded_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        full_method = handler_call_details.method
        if handler is None or full_method.startswith(self._excluded):
            return handler
        call = _Call(self, full_method, handler_call_details.invocation_metadata)
        h: Any = handler  # the stubs type the behaviours as sync callables; under grpc.aio they are async
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                call.unary(h.unary_unary), h.request_deserializer, h.response_serializer
            )
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                call.stream(h.unary_stream), h.request_deserializer, h.response_serializer
            )
        if h.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                call.unary(h.stream_unary), h.request_deserializer, h.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            call.stream(h.stream_stream), h.request_deserializer, h.response_serializer
        )


class _Call:
    """One method's instrumentation: makes the wrapped behaviours and records each call's end."""

    def __init__(self, owner: ServerTelemetry, full_method: str, metadata: Any) -> None:
        self._tracer = owner.tracer
        self._metrics = owner.metrics
        self._metadata = metadata
        self.name = full_method.lstrip("/")
        service, _, self.method = self.name.rpartition("/")
        self._attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": self.method}

    def _start(self, context: Context) -> Span:
        span = self._tracer.start_span(
            self.name,
            context=extract_from_metadata(self._metadata),
            kind=SpanKind.SERVER,
            attributes=self._attributes,
        )
        address, port = _peer(context.peer())
        if address:
            span.set_attribute("network.peer.address", address)
        if port is not None:
            span.set_attribute("network.peer.port", port)
        self._metrics.inflight.labels(DOOR, self.method).inc()
        return span

    def unary(self, behavior: Callable[[Any, Context], Awaitable[Any]]) -> Callable[[Any, Context], Any]:
        async def wrapper(request: Any, context: Context) -> Any:
            started = time.monotonic()
            span = self._start(context)
            error: str | None = None
            try:
                with trace.use_span(span, end_on_exit=False, record_exception=False):
                    return await behavior(request, context)
            except BaseException as exc:
                error = _exception_error(exc, span)
                raise
            finally:
                self._end(span, context, started, error)

        return wrapper

    def stream(
        self, behavior: Callable[[Any, Context], AsyncGenerator[Any, None]]
    ) -> Callable[[Any, Context], Any]:
        async def wrapper(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.monotonic()
            span = self._start(context)
            error: str | None = None
            first_delta_seen = False
            last: Any = None
            # The span is current only while the behaviour runs, never across a `yield`: gRPC may
            # leave this generator suspended there and have it closed later from another task,
            # whose context could not detach what this one attached.
            in_span = trace.set_span_in_context(span)
            responses = behavior(request, context)
            try:
                while True:
                    try:
                        response = await _in_context(in_span, anext(responses))
                    except StopAsyncIteration:
                        break
                    if not first_delta_seen and isinstance(response, chat_pb2.ChatEvent):
                        first_delta_seen = self._before_first_delta(response, span, started)
                    last = response
                    yield response
                if isinstance(last, chat_pb2.ChatEvent) and last.WhichOneof("event") == "error":
                    error = code_name(last.error.code)
                    span.set_status(Status(StatusCode.ERROR, last.error.message))
            except BaseException as exc:
                error = _exception_error(exc, span)
                raise
            finally:
                with contextlib.suppress(Exception):
                    await _in_context(in_span, responses.aclose())  # the behaviour's own cleanup
                self._end(span, context, started, error)

        return wrapper

    def _before_first_delta(self, event: chat_pb2.ChatEvent, span: Span, started: float) -> bool:
        kind = event.WhichOneof("event")
        if kind == "started":
            span.set_attribute(REQUEST_ID, event.started.request_id)
        elif kind == "delta":
            self._metrics.time_to_first_delta.labels(DOOR, self.method).observe(time.monotonic() - started)
            span.add_event("first token")
            return True
        return False

    def _end(self, span: Span, context: Context, started: float, error: str | None) -> None:
        code = _final_code(context, error)
        span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
        if code is not grpc.StatusCode.OK:
            error = error or code.name
            span.set_status(Status(StatusCode.ERROR, _details(context)))
        if error is not None:
            span.set_attribute(ERROR_TYPE, error)
        span.end()
        outcome = "ok" if error is None else "cancelled" if error == "CANCELLED" else "error"
        self._metrics.requests.labels(DOOR, self.method, outcome, error or "OK").inc()
        self._metrics.duration.labels(DOOR, self.method).observe(time.monotonic() - started)
        self._metrics.inflight.labels(DOOR, self.method).dec()


async def _in_context(ctx: otel_context.Context, step: Awaitable[Any]) -> Any:
    """Await `step` with `ctx` current, attached and detached in this same context."""
    token = otel_context.attach(ctx)
    try:
        return await step
    finally:
        otel_context.detach(token)


def _final_code(context: Context, error: str | None) -> grpc.StatusCode:
    if error == "CANCELLED":
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions keep the number
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    # Unset: OK unless the handler raised something that was not an abort (then grpc answers UNKNOWN).
    return grpc.StatusCode.UNKNOWN if error == "UNKNOWN" else grpc.StatusCode.OK


def _details(context: Context) -> str | None:
    try:
        details = context.details()
    except Exception:
        return None
    if isinstance(details, bytes):
        return details.decode(errors="replace")
    return details if isinstance(details, str) else None


def _exception_error(exc: BaseException, span: Span) -> str | None:
    """The error an exception leaving the handler means: None for an abort (its code says it)."""
    if isinstance(exc, grpc.aio.AbortError):
        return None
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    span.record_exception(exc)
    return "UNKNOWN"


def _peer(peer: str) -> tuple[str | None, int | None]:
    """`ipv4:127.0.0.1:5000` / `ipv6:[::1]:5000` as (address, port)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None, None
    host, _, port = rest.rpartition(":")
    return host.strip("[]") or None, int(port) if port.isdigit() else None
