"""The HTTP door observed like the gRPC one: a SERVER span per request, parented by the caller's
`traceparent` header (and itself the parent of the queue's PRODUCER span), the frontend's request
metrics under `door="http"`, and one log line per request with its request id."""

from __future__ import annotations

import logging
import time

from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from mistral_serve.common.logs import bind_request_id

from ..metrics import FrontendMetrics
from ..tracing import ERROR_TYPE, REQUEST_ID

log = logging.getLogger(__name__)
DOOR = "http"


class HttpCall:
    """One request's span and metrics, from its arrival to `end`."""

    def __init__(
        self, tracer: trace.Tracer, metrics: FrontendMetrics, request: web.Request, method: str
    ) -> None:
        self._metrics = metrics
        self._method = method
        self._http = f"{request.method} {request.path}"
        self._started = time.monotonic()
        self._first_delta = False
        self.request_id: str | None = None
        carrier = {
            k.lower(): v for k, v in request.headers.items() if k.lower() in ("traceparent", "tracestate")
        }
        route = request.match_info.route.resource
        self.span: Span = tracer.start_span(
            f"{request.method} {route.canonical if route is not None else request.path}",
            context=propagate.extract(carrier) if carrier else None,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.path},
        )
        if request.remote:
            self.span.set_attribute("network.peer.address", request.remote)
        metrics.inflight.labels(DOOR, method).inc()

    def started(self, request_id: str) -> None:
        self.request_id = request_id
        bind_request_id(request_id)
        self.span.set_attribute(REQUEST_ID, request_id)

    def delta(self) -> None:
        if not self._first_delta:
            self._first_delta = True
            self._metrics.time_to_first_delta.labels(DOOR, self._method).observe(
                time.monotonic() - self._started
            )
            self.span.add_event("first token")

    def end(self, status: int, code: str, message: str | None = None) -> None:
        """`code`: the gRPC / google.rpc code name of the outcome ("OK", "CANCELLED", ...)."""
        self.span.set_attribute("http.response.status_code", status)
        if code != "OK":
            self.span.set_attribute(ERROR_TYPE, code)
            self.span.set_status(Status(StatusCode.ERROR, message))
        self.span.end()
        outcome = "ok" if code == "OK" else "cancelled" if code == "CANCELLED" else "error"
        self._metrics.requests.labels(DOOR, self._method, outcome, code).inc()
        self._metrics.duration.labels(DOOR, self._method).observe(time.monotonic() - self._started)
        self._metrics.inflight.labels(DOOR, self._method).dec()
        log.info(
            "%s %d %s",
            self._http,
            status,
            code,
            extra={} if self.request_id is None else {"request_id": self.request_id},
        )
