"""An OTLP/gRPC trace receiver for tests, built from opentelemetry-proto: it keeps every span it is
sent, flattened to a small record, and lets a test wait for the spans of one trace."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

T = TypeVar("T")

SPAN_KINDS = {
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "producer",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "consumer",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "internal",
}


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int  # trace_pb2.Status.StatusCode
    status_message: str

    @property
    def is_error(self) -> bool:
        return self.status_code == trace_pb2.Status.STATUS_CODE_ERROR

    @property
    def event_names(self) -> list[str]:
        return [name for name, _ in self.events]


@dataclass
class _Store:
    spans: list[ReceivedSpan] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            kind=SPAN_KINDS.get(span.kind, "unspecified"),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes=_attributes(span.attributes),
                            events=[(e.name, _attributes(e.attributes)) for e in span.events],
                            status_code=span.status.code,
                            status_message=span.status.message,
                        )
                    )
        with self._store.changed:
            self._store.spans.extend(received)
            self._store.changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """A real OTLP/gRPC endpoint on a free loopback port (plain text)."""

    def __init__(self) -> None:
        self._store = _Store()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self._store), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(0)

    def all_spans(self) -> list[ReceivedSpan]:
        with self._store.changed:
            return list(self._store.spans)

    def wait_for(self, found: Callable[[list[ReceivedSpan]], T | None], timeout_s: float = 30.0) -> T:
        """What `found` returns from the spans received so far, once it is not None; woken by each
        export, not by a timer. Blocking: call it from a thread (`asyncio.to_thread`) in async tests."""
        end = time.monotonic() + timeout_s
        with self._store.changed:
            while (result := found(self._store.spans)) is None:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"not received in {timeout_s:.0f}s; spans so far: {self._store.spans}"
                    )
                self._store.changed.wait(left)
            return result

    def wait_for_trace(self, trace_id: str, names: set[str], timeout_s: float = 30.0) -> list[ReceivedSpan]:
        """The spans of `trace_id`, once one span of each name in `names` has arrived."""

        def complete(spans: list[ReceivedSpan]) -> list[ReceivedSpan] | None:
            of_trace = [s for s in spans if s.trace_id == trace_id]
            return of_trace if names <= {s.name for s in of_trace} else None

        return self.wait_for(complete, timeout_s)
