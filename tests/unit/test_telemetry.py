"""Tracing set up from the OTEL_* environment, trace context across the queue, logs with trace ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from mistral_serve.common.env import env_port_or_off
from mistral_serve.common.logs import JsonFormatter, TraceContextFilter, bind_request_id
from mistral_serve.common.telemetry import build_tracer_provider, span_exporter, tracing_wanted
from mistral_serve.common.tracecontext import extract_from, extract_from_metadata, inject_into
from mistral_serve.queue.v1 import queue_pb2

OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
    ],
)
def test_tracing_is_on_only_when_an_exporter_or_endpoint_is_configured(
    environ: dict[str, str], wanted: bool
) -> None:
    assert tracing_wanted(environ) is wanted
    assert (build_tracer_provider(environ, "svc") is not None) is wanted


def test_otlp_grpc_is_the_default_exporter_and_http_protobuf_is_chosen_by_protocol() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    assert isinstance(span_exporter({}), Grpc)
    assert isinstance(span_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}), Http)
    assert isinstance(span_exporter({"OTEL_TRACES_EXPORTER": "console"}), ConsoleSpanExporter)
    assert span_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}) is None


def test_service_name_defaults_per_process_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"OTEL_TRACES_EXPORTER": "console"}
    provider = build_tracer_provider(environ, "mistral-serve-worker")
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "mistral-serve-worker"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "worker-a")
    named = build_tracer_provider(environ, "mistral-serve-worker")
    assert named is not None
    assert named.resource.attributes["service.name"] == "worker-a"


def test_sampler_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    provider = build_tracer_provider(dict(os.environ, OTEL_TRACES_EXPORTER="console"), "svc")
    assert provider is not None
    assert "0.25" in provider.sampler.get_description()


def test_trace_context_survives_the_queue() -> None:
    tracer = TracerProvider().get_tracer("test")
    queued = queue_pb2.QueuedRequest(request_id="r1")
    with tracer.start_as_current_span("producer") as span:
        inject_into(queued)
    sent = span.get_span_context()
    assert queued.traceparent.startswith(f"00-{sent.trace_id:032x}-{sent.span_id:016x}-")

    received = queue_pb2.QueuedRequest.FromString(queued.SerializeToString())
    parent = trace.get_current_span(extract_from(received)).get_span_context()
    assert (parent.trace_id, parent.span_id, parent.is_remote) == (sent.trace_id, sent.span_id, True)


def test_no_trace_context_gives_a_new_root() -> None:
    assert not trace.get_current_span(extract_from(queue_pb2.QueuedRequest())).get_span_context().is_valid
    assert not trace.get_current_span(extract_from_metadata(None)).get_span_context().is_valid


def test_callers_traceparent_is_read_from_grpc_metadata() -> None:
    metadata: list[tuple[str, str | bytes]] = [
        ("authorization", "Bearer x"),
        ("Traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("bin-bin", b"\x00"),
    ]
    parent = trace.get_current_span(extract_from_metadata(metadata)).get_span_context()
    assert parent.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert parent.span_id == 0x00F067AA0BA902B7


def test_json_logs_carry_trace_and_request_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter("mistral-serve-worker"))
    logger = logging.getLogger("test_json_logs_carry_trace_and_request_ids")
    logger.addHandler(handler)
    logger.propagate = False
    tracer = TracerProvider().get_tracer("test")

    async def in_a_task() -> None:
        bind_request_id("req-1")
        with tracer.start_as_current_span("work") as span:
            logger.warning("inside")
        expected = span.get_span_context()
        entry = json.loads(stream.getvalue())
        assert entry["trace_id"] == f"{expected.trace_id:032x}"
        assert entry["span_id"] == f"{expected.span_id:016x}"
        assert entry["request_id"] == "req-1"
        assert entry["service"] == "mistral-serve-worker"

    asyncio.run(in_a_task())


@pytest.mark.parametrize(("raw", "port"), [(None, 9090), ("0", 0), ("9100", 9100), ("off", None)])
def test_metrics_port_reads_a_number_zero_or_off(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, port: int | None
) -> None:
    if raw is not None:
        monkeypatch.setenv("MISTRAL_SERVE_METRICS_PORT", raw)
    else:
        monkeypatch.delenv("MISTRAL_SERVE_METRICS_PORT", raising=False)
    assert env_port_or_off("METRICS_PORT", 9090) == port


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_TRACES_EXPORTER": "zipkin"},
    ],
)
def test_tracing_asked_for_but_unsupported_is_off_with_an_error_naming_the_setting(
    environ: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mistral_serve.common.telemetry"):
        assert build_tracer_provider(environ, "svc") is None
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    named = "OTEL_EXPORTER_OTLP_PROTOCOL=http/json" if "OTEL_EXPORTER_OTLP_PROTOCOL" in environ else "zipkin"
    assert "tracing is OFF" in record.getMessage() and named in record.getMessage()
