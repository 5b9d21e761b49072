"""OpenTelemetry tracing for both processes, set up once from the standard `OTEL_*` variables, and the
Prometheus `/metrics` endpoint each process serves.

Tracing is on when an OTLP endpoint is named (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER` asks for an exporter (`otlp`,
`console`); otherwise nothing is installed and every span is the API's no-op. `OTEL_SDK_DISABLED=true`
or `OTEL_TRACES_EXPORTER=none` turns it off. The exporter is OTLP/gRPC unless
`OTEL_EXPORTER_OTLP_PROTOCOL` says `http/protobuf` (any other value turns tracing off, with an
ERROR log saying why); the sampler (`OTEL_TRACES_SAMPLER`/`_ARG`), the
batching (`OTEL_BSP_*`), headers and TLS are the SDK's own readings of the environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import prometheus_client
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger(__name__)

# The name under which both processes' spans are made (the instrumentation scope).
SCOPE = "mistral_serve"
# The OTLP protocols this build exports with; the chart's values.schema.json allows exactly these.
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
TRACES_EXPORTERS = ("otlp", "console", "none")


def tracing_wanted(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def span_exporter(environ: Mapping[str, str]) -> SpanExporter | None:
    """The exporter the environment asks for; None (logged as an error) for one this build cannot make."""
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter == "console":
        return ConsoleSpanExporter()
    if exporter != "otlp":
        _tracing_off(f"OTEL_TRACES_EXPORTER={exporter} is not one of {', '.join(TRACES_EXPORTERS)}")
        return None
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter()
    _tracing_off(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not one of {', '.join(OTLP_PROTOCOLS)}")
    return None


def _tracing_off(reason: str) -> None:
    """Tracing was asked for and cannot run: say so loudly, since no span will ever arrive."""
    log.error("tracing is OFF although it was configured: %s", reason)


def build_tracer_provider(environ: Mapping[str, str], default_service_name: str) -> TracerProvider | None:
    """A provider exporting as `environ` says, or None when tracing is not configured."""
    if not tracing_wanted(environ):
        return None
    exporter = span_exporter(environ)
    if exporter is None:
        return None
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; they win over our default.
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER/_ARG
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


@dataclass
class Tracing:
    """What `setup_tracing` installed; `shutdown` flushes the spans still batched."""

    provider: TracerProvider | None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def setup_tracing(default_service_name: str) -> Tracing:
    """Install the process's tracer provider from the environment (once, at start)."""
    provider = build_tracer_provider(os.environ, default_service_name)
    if provider is not None:
        trace.set_tracer_provider(provider)
        log.info(
            "tracing on: service %s, sampler %s",
            provider.resource.attributes.get(SERVICE_NAME),
            provider.sampler.get_description(),
        )
    return Tracing(provider)


def get_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """The tracer of this service: from `provider` (tests), else the global one (a no-op until set)."""
    return trace.get_tracer(SCOPE, tracer_provider=provider)


class _Forward(Collector):
    """Another registry's series (the process's global one: process stats, vLLM's own metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[prometheus_client.Metric]:
        return self._registry.collect()


@dataclass
class MetricsServer:
    """A `/metrics` HTTP endpoint on its own thread."""

    server: WSGIServer
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve `registry`, plus the process-wide default registry, on `host:port` (0 picks a free port)."""
    exposed = CollectorRegistry(auto_describe=False)
    exposed.register(_Forward(registry))
    exposed.register(_Forward(prometheus_client.REGISTRY))
    server, _thread = prometheus_client.start_http_server(port, addr=host, registry=exposed)
    return MetricsServer(server, int(server.server_port))
