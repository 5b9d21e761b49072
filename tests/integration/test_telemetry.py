"""One trace across the queue, and the metrics, with the frontend and the worker as separate processes
exporting to an OTLP/gRPC receiver this module starts. One frontend and one worker serve all tests
here (process starts are the expensive part); each test finds its own request's trace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from mistral_serve.common import keys
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import REPO, Processes, RedisServer
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.requests import chat
from tests.support.waiting import until

MODEL = "mistral-small-under-test"
# Where the weights are is not what the model is called: spans and metrics name the folder's model.
MODEL_PATH = f"/models/{MODEL}/"
STREAM = keys.request_stream("default")
SERVER_SPAN = "mistral_serve.v1.ChatService/ChatStream"
PRODUCER_SPAN = f"send {STREAM}"
CONSUMER_SPAN = f"process {STREAM}"
GENERATION_SPAN = f"chat {MODEL}"
ALL_SPANS = {SERVER_SPAN, PRODUCER_SPAN, CONSUMER_SPAN, GENERATION_SPAN}


@dataclass
class TracedStack:
    receiver: OtlpReceiver
    grpc_port: int
    frontend_metrics_port: int
    worker_metrics_port: int


@pytest.fixture(scope="module")
def traced(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedStack]:
    redis.Redis(port=redis_server.port).flushall()
    receiver = OtlpReceiver()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "MISTRAL_SERVE_MODEL": MODEL_PATH,
        }
    )
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_SERVICE_NAME",
        "MISTRAL_SERVE_TRACE_CONTENT",
    ):
        env.pop(name, None)
    processes = Processes(redis_server.url, env, tmp_path_factory.mktemp("traced"))
    try:
        frontend = asyncio.run(processes.start("frontend", health_interval_s="0.1"))
        worker = asyncio.run(processes.start("worker", block_ms="200"))
        asyncio.run(processes.launcher.ready(frontend))
        asyncio.run(processes.launcher.ready(worker))
        yield TracedStack(
            receiver, frontend.ports["grpc"], frontend.ports["metrics"], worker.ports["metrics"]
        )
    finally:
        processes.stop_all()
        receiver.stop()


async def run_chat(
    stack: TracedStack, request: chat_pb2.ChatRequest, metadata: tuple[tuple[str, str], ...] = ()
) -> list[chat_pb2.ChatEvent]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        call = stub.ChatStream(chat_pb2.ChatStreamRequest(request=request), timeout=30, metadata=metadata)
        return [event async for event in call]


async def trace_of(stack: TracedStack, request_id: str) -> dict[str, ReceivedSpan]:
    """The four spans of the request's trace, by name, once all have arrived."""

    def server_span(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
        return next(
            (
                s
                for s in spans
                if s.name == SERVER_SPAN and s.attributes.get("mistral_serve.request_id") == request_id
            ),
            None,
        )

    # The receiver blocks on a condition its exports signal: in a thread, so the event loop runs on.
    server = await asyncio.to_thread(stack.receiver.wait_for, server_span)
    spans = await asyncio.to_thread(stack.receiver.wait_for_trace, server.trace_id, ALL_SPANS)
    by_name = {span.name: span for span in spans}
    assert len(by_name) == len(spans), f"one span of each name expected: {spans}"
    return by_name


def assert_one_chain(spans: dict[str, ReceivedSpan]) -> None:
    server, producer = spans[SERVER_SPAN], spans[PRODUCER_SPAN]
    consumer, generation = spans[CONSUMER_SPAN], spans[GENERATION_SPAN]
    assert len({s.trace_id for s in spans.values()}) == 1
    assert (server.kind, producer.kind, consumer.kind) == ("server", "producer", "consumer")
    assert producer.parent_span_id == server.span_id
    assert consumer.parent_span_id == producer.span_id
    assert generation.parent_span_id == consumer.span_id
    assert (server.service, producer.service) == ("mistral-serve-frontend", "mistral-serve-frontend")
    assert (consumer.service, generation.service) == ("mistral-serve-worker", "mistral-serve-worker")


async def test_one_trace_links_frontend_producer_consumer_and_generation(traced: TracedStack) -> None:
    request = chat("tell me about queues", max_tokens=5)
    request.sampling.temperature = 0.7  # a float32 in the proto: the span shows 0.7, not 0.699999988
    request.sampling.top_p = 0.9
    request.sampling.seed = 7
    events = await run_chat(traced, request)
    request_id = events[0].started.request_id
    finished = events[-1].finished
    assert events[-1].WhichOneof("event") == "finished"

    spans = await trace_of(traced, request_id)
    assert_one_chain(spans)
    server, generation = spans[SERVER_SPAN], spans[GENERATION_SPAN]
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.method"] == "ChatStream"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert not server.is_error
    assert spans[PRODUCER_SPAN].attributes["messaging.destination.name"] == STREAM
    assert generation.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "mistral_ai",
        "gen_ai.request.model": MODEL,
        "gen_ai.request.temperature": 0.7,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.max_tokens": 5,
        "gen_ai.request.seed": 7,
        "gen_ai.response.id": request_id,
        "gen_ai.response.finish_reasons": ["length"],
        "gen_ai.usage.input_tokens": 4,
        "gen_ai.usage.output_tokens": 5,
    }
    assert finished.usage.prompt_tokens == 4 and finished.usage.completion_tokens == 5
    assert generation.event_names == ["queued", "started", "first token"]
    assert not generation.is_error


async def test_failed_request_trace_has_error_status_and_type(traced: TracedStack) -> None:
    events = await run_chat(traced, chat("[fail] this prompt"))
    request_id = events[0].started.request_id
    assert events[-1].WhichOneof("event") == "error"

    spans = await trace_of(traced, request_id)
    assert_one_chain(spans)
    generation, consumer, server = spans[GENERATION_SPAN], spans[CONSUMER_SPAN], spans[SERVER_SPAN]
    assert generation.is_error and consumer.is_error
    assert generation.attributes["error.type"] == "EngineRequestError"
    assert "exception" in generation.event_names
    assert server.is_error
    assert server.attributes["error.type"] == "INVALID_ARGUMENT"
    assert not spans[PRODUCER_SPAN].is_error


async def test_callers_traceparent_is_the_parent_of_the_server_span(traced: TracedStack) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    metadata = (("traceparent", f"00-{trace_id}-{parent_id}-01"),)
    events = await run_chat(traced, chat("traced by the caller"), metadata)
    assert events[-1].WhichOneof("event") == "finished"

    spans = {s.name: s for s in await asyncio.to_thread(traced.receiver.wait_for_trace, trace_id, ALL_SPANS)}
    assert spans[SERVER_SPAN].parent_span_id == parent_id
    assert spans[SERVER_SPAN].attributes["mistral_serve.request_id"] == events[0].started.request_id
    assert_one_chain(spans)


async def test_message_contents_are_not_recorded_by_default(traced: TracedStack) -> None:
    secret = "zebraquartzsecret"
    events = await run_chat(traced, chat(f"{secret} is my password"))
    assert secret in "".join(e.delta.text for e in events)  # the scripted engine echoes the prompt

    spans = await trace_of(traced, events[0].started.request_id)
    recorded = [str(span.attributes) + str(span.events) for span in spans.values()]
    assert all(secret not in text for text in recorded)
    assert "gen_ai.input.messages" not in spans[GENERATION_SPAN].attributes


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def moved(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in after, f"{name}{labels} is not exported"
    return after[key] - before.get(key, 0.0)


async def test_metrics_of_both_processes_move_after_a_chat(traced: TracedStack) -> None:
    frontend_before, worker_before = scrape(traced.frontend_metrics_port), scrape(traced.worker_metrics_port)
    events = await run_chat(traced, chat("count this", max_tokens=4))
    assert events[-1].WhichOneof("event") == "finished"
    frontend = scrape(traced.frontend_metrics_port)
    # The worker counts the job right after its terminal event is written, which may be after the
    # caller has it: scrape until the count moved (or give up and let the assertions say what).
    jobs_key = ("mistral_serve_worker_jobs_total", (("code", "LENGTH"), ("outcome", "finished")))
    scraped = [worker_before]

    def counted() -> bool:
        scraped.append(scrape(traced.worker_metrics_port))
        return scraped[-1].get(jobs_key, 0) > worker_before.get(jobs_key, 0)

    with contextlib.suppress(AssertionError):
        await until(counted, timeout_s=5)
    worker = scraped[-1]

    method = {"door": "grpc", "method": "ChatStream"}
    assert (
        moved(frontend_before, frontend, "mistral_serve_requests_total", outcome="ok", code="OK", **method)
        == 1
    )
    assert moved(frontend_before, frontend, "mistral_serve_request_duration_seconds_count", **method) == 1
    assert moved(frontend_before, frontend, "mistral_serve_time_to_first_token_seconds_count", **method) == 1
    admitted = {"pool": "default", "band": "normal", "result": "admitted"}
    assert moved(frontend_before, frontend, "mistral_serve_queue_admissions_total", **admitted) == 1
    assert ("mistral_serve_queue_depth", (("band", "normal"), ("pool", "default"))) in frontend

    gen_ai = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "mistral_ai",
        "gen_ai_request_model": MODEL,
    }
    assert (
        moved(worker_before, worker, "mistral_serve_worker_jobs_total", outcome="finished", code="LENGTH")
        == 1
    )
    assert (
        moved(
            worker_before, worker, "mistral_serve_gen_ai_tokens_total", gen_ai_token_type="output", **gen_ai
        )
        == 4
    )
    assert (
        moved(worker_before, worker, "mistral_serve_gen_ai_tokens_total", gen_ai_token_type="input", **gen_ai)
        == 2
    )
    for histogram in ("time_to_first_token", "time_per_output_token"):
        name = f"mistral_serve_gen_ai_server_{histogram}_seconds_count"
        assert moved(worker_before, worker, name, **gen_ai) == 1
    duration = "mistral_serve_gen_ai_server_request_duration_seconds_count"
    assert moved(worker_before, worker, duration, error_type="", **gen_ai) == 1
    assert moved(worker_before, worker, "mistral_serve_queue_time_seconds_count") == 1
    assert worker[("mistral_serve_worker_inflight_jobs", ())] == 0
    assert worker[("mistral_serve_engine_requests", (("state", "running"),))] == 0
    assert ("mistral_serve_worker_resumes_total", ()) in worker
    assert ("mistral_serve_worker_aborts_total", ()) in worker
    assert any(name.startswith("process_") for name, _ in worker), "the process-wide registry is served too"
