"""The OpenAI-compatible HTTP door at the raw HTTP level (aiohttp client, real frontend, Redis, scripted
workers): the shapes callers parse, SSE ids and resume, tool-call fragments, every error status with
its JSON, cancel, probes, and the SERVER span and metrics of the door."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mistral_serve.common.logs import JsonFormatter
from mistral_serve.frontend.server import Frontend, start_frontend
from tests.integration.conftest import Stack
from tests.support.scripted_engine import ScriptedEngine
from tests.support.sse import joined_text, joined_tool_calls, read_events
from tests.support.waiting import until, until_async

MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "my_calculator",
        "description": "evaluate a math expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}
# The scripted engine repeats the prompt's words: this prompt makes it write a tool call.
TOOL_CALL_TEXT = '[TOOL_CALLS]my_calculator[ARGS]{"expression": "19 - (8 + 2) + 1"}'


def body(text: str = "hello there", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **fields}


def url(frontend: Frontend, path: str = "/v1/chat/completions") -> str:
    return f"http://127.0.0.1:{frontend.http_port}{path}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
async def door(stack: Stack) -> Frontend:
    frontend = await stack.frontend()
    await stack.worker()
    return frontend


async def test_a_completion_has_openai_s_shape(door: Frontend, http: aiohttp.ClientSession) -> None:
    async with http.post(url(door), json=body("say it", max_tokens=4)) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["object"] == "chat.completion"
    assert answer["id"].startswith("chatcmpl-")
    assert answer["model"] == MODEL
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "say it w1 w2", "tool_calls": []}
    assert choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


async def test_a_stream_is_sse_chunks_with_ids_usage_and_done(
    door: Frontend, http: aiohttp.ClientSession
) -> None:
    request = body("count", max_tokens=5, stream=True, stream_options={"include_usage": True})
    async with http.post(url(door), json=request) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = await read_events(response)
    assert events[-1].data == "[DONE]"
    chunks = [e.json for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    request_id = chunks[0]["id"].removeprefix("chatcmpl-")
    # started is 0, then one id per delta: 1, 2, 3...; the closing chunks carry none.
    ids = [e.id for e in events if e.id is not None]
    assert ids == [f"{request_id}/{n}" for n in range(len(ids))]
    assert joined_text(events) == "count w1 w2 w3 w4"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_streamed_tool_call_fragments_join_to_the_non_streamed_call(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    frontend = await stack.frontend()
    await stack.worker(ScriptedEngine(default_tokens=len(TOOL_CALL_TEXT.split())))
    request = body(TOOL_CALL_TEXT, tools=[CALC_TOOL], tool_choice="auto")
    async with http.post(url(frontend), json=request) as response:
        whole = await response.json()
    async with http.post(url(frontend), json={**request, "stream": True}) as response:
        events = await read_events(response)
    message = whole["choices"][0]["message"]
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["function"] == {"name": "my_calculator", "arguments": '{"expression": "19 - (8 + 2) + 1"}'}
    assert len(call["id"]) == 9
    fragments = [f for e in events[:-1] for c in e.json["choices"] for f in c["delta"].get("tool_calls", [])]
    assert len(fragments) > 1, "the arguments arrive in fragments"
    assert "id" in fragments[0] and all("id" not in f for f in fragments[1:])
    # Call ids are seeded by the request id, so the two runs' ids differ; all else is equal.
    [streamed] = joined_tool_calls(events)
    assert len(streamed.pop("id")) == 9
    assert streamed == {k: v for k, v in call.items() if k != "id"}
    assert events[-2].json["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_stream_broken_off_resumes_by_last_event_id_on_another_frontend(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    first, second = await stack.frontend(), await stack.frontend()
    await stack.worker(ScriptedEngine(tokens_per_s=200, default_tokens=40))
    request = body("resume me", stream=True)
    async with http.post(url(first), json=request) as response:
        undisturbed = await read_events(response)
    async with http.post(url(first), json=request) as response:
        head = await read_events(response, stop_after=6)  # then the connection is dropped
    last_id = head[-1].id
    assert last_id is not None
    async with http.post(url(second), json=request, headers={"Last-Event-ID": last_id}) as response:
        assert response.status == 200, await response.text()
        tail = await read_events(response)
    sequences = [int(e.id.rpartition("/")[2]) for e in head + tail if e.id is not None]
    assert sequences == list(range(len(sequences))), "no gap and no duplicate"
    assert joined_text(head + tail) == joined_text(undisturbed)
    assert tail[-1].data == "[DONE]"


async def test_resume_is_for_the_owner_only(stack: Stack, http: aiohttp.ClientSession) -> None:
    from tests.integration.front_door_cases import API_KEY, API_KEY_DIGEST

    other_digest = "0" * 64
    frontend = await stack.frontend(api_keys=(API_KEY_DIGEST, other_digest))
    await stack.worker()
    mine = {"Authorization": f"Bearer {API_KEY}"}
    async with http.post(url(frontend), json=body(stream=True), headers=mine) as response:
        events = await read_events(response)
    resume = {"Authorization": "Bearer somebody-else", "Last-Event-ID": events[0].id or ""}
    async with http.post(url(frontend), json=body(stream=True), headers=resume) as response:
        assert response.status == 401  # an unknown key
    async with http.post(
        url(frontend), json=body(stream=True), headers={**mine, "Last-Event-ID": "nope"}
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "Last-Event-ID"
    missing = {**mine, "Last-Event-ID": "0123456789abcdef0123456789abcdef/0"}
    async with http.post(url(frontend), json=body(stream=True), headers=missing) as response:
        assert response.status == 404
        assert response.headers["x-should-retry"] == "false"


async def test_an_error_after_the_stream_started_is_its_last_event(
    door: Frontend, http: aiohttp.ClientSession
) -> None:
    async with http.post(url(door), json=body("[fail] please", stream=True)) as response:
        assert response.status == 200
        events = await read_events(response)
    assert events[-1].data == "[DONE]"
    error = events[-2].json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_argument"
    assert "refuses" in error["message"]


async def test_cancel_ends_a_running_stream_and_is_owner_only(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    frontend = await stack.frontend()
    await stack.worker(ScriptedEngine(tokens_per_s=50, default_tokens=500))
    async with http.post(url(frontend), json=body(stream=True)) as response:
        head = await read_events(response, stop_after=2)
        completion_id = head[0].json["id"]
        async with http.post(url(frontend, f"/v1/chat/completions/{completion_id}/cancel")) as cancelled:
            assert cancelled.status == 200
            assert (await cancelled.json())["cancelled"] is True
        tail = await read_events(response)
    # A cancelled request ends with a CANCELLED error event, as over gRPC.
    assert tail[-2].json["error"]["code"] == "cancelled"
    assert tail[-1].data == "[DONE]"
    async with http.post(url(frontend, "/v1/chat/completions/chatcmpl-nosuch/cancel")) as unknown:
        assert unknown.status == 404
        assert (await unknown.json())["error"]["type"] == "not_found_error"


async def test_a_caller_that_disconnects_leaves_the_request_running_for_the_grace(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    frontend = await stack.frontend(detach_grace_s=5.0)
    engine = ScriptedEngine(tokens_per_s=100, default_tokens=30)
    await stack.worker(engine)
    async with http.post(url(frontend), json=body("go away", stream=True)) as response:
        head = await read_events(response, stop_after=2)
    assert head[1].id is not None
    await until(lambda: len(engine.started_ids) == 1)
    async with http.post(url(frontend), json=body(stream=True), headers={"Last-Event-ID": head[1].id}) as r:
        tail = await read_events(r)
    assert tail[-2].json["choices"][0]["finish_reason"] == "stop"
    assert engine.aborted_ids == []


async def test_models_and_probes(door: Frontend, http: aiohttp.ClientSession) -> None:
    async with http.get(url(door, "/v1/models")) as response:
        models = await response.json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == MODEL
    assert models["data"][0]["object"] == "model"
    assert models["data"][0]["max_model_len"] == door.settings.context_length
    assert models["data"][0]["default_system_prompt"] is True  # the model card's advice, by default
    async with http.get(url(door, "/health/live")) as response:
        assert response.status == 200

    async def ready() -> int:
        async with http.get(url(door, "/health/ready")) as response:
            return response.status

    async def is_ready() -> bool:
        return await ready() == 200

    await until_async(is_ready, timeout_s=10)
    await door.health.drain()
    assert await ready() == 503


async def test_a_configured_alias_names_the_model(stack: Stack, http: aiohttp.ClientSession) -> None:
    frontend = await stack.frontend(model_aliases=("mistral-small",))
    await stack.worker()
    async with http.post(url(frontend), json={**body(max_tokens=2), "model": "mistral-small"}) as response:
        assert response.status == 200
        assert (await response.json())["model"] == "mistral-small"


async def expect_error(
    http: aiohttp.ClientSession, target: str, status: int, param: str | None, **kwargs: Any
) -> tuple[dict[str, Any], Any]:
    async with http.post(target, **kwargs) as response:
        assert response.status == status, await response.text()
        payload = await response.json()
        headers = response.headers
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return error, headers


async def test_every_refusal_has_its_status_and_openai_s_error_shape(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    from tests.integration.front_door_cases import API_KEY, API_KEY_DIGEST, SMALL_PNG, data_url

    frontend = await stack.frontend(api_keys=(API_KEY_DIGEST,), max_receive_message_bytes=64 * 1024)
    target = url(frontend)
    key = {"Authorization": f"Bearer {API_KEY}"}
    error, headers = await expect_error(http, target, 400, "n", json={**body(), "n": 2}, headers=key)
    assert headers["x-should-retry"] == "false"
    assert error["type"] == "invalid_request_error"
    image = {
        "role": "system",
        "content": [
            {"type": "text", "text": "x"},
            {"type": "image_url", "image_url": {"url": data_url(SMALL_PNG)}},
        ],
    }
    request = {**body(), "messages": [image, {"role": "user", "content": "hi"}]}
    await expect_error(http, target, 400, "messages[0].content[1].image_url", json=request, headers=key)
    await expect_error(http, target, 400, "temperature", json={**body(), "temperature": 9}, headers=key)
    await expect_error(http, target, 400, "temperature", json={**body(), "temperature": "hot"}, headers=key)
    await expect_error(http, target, 400, None, data=b"{not json", headers=key)
    error, _ = await expect_error(http, target, 401, None, json=body())
    assert error["code"] == "invalid_api_key"
    await expect_error(http, target, 401, None, json=body(), headers={"Authorization": "Bearer wrong"})
    error, headers = await expect_error(
        http, target, 404, "model", json={**body(), "model": "gpt-4o"}, headers=key
    )
    assert error["code"] == "model_not_found"
    assert headers["x-should-retry"] == "false"
    error, _ = await expect_error(http, target, 413, None, json=body("x" * 70_000), headers=key)
    assert error["code"] == "request_too_large"
    async with http.get(url(frontend, "/v1/nothing-here")) as response:
        assert response.status == 404
        assert (await response.json())["error"]["type"] == "not_found_error"


async def test_a_full_queue_is_429_with_retry_after(stack: Stack, http: aiohttp.ClientSession) -> None:
    frontend = await stack.frontend(max_backlog=1, retry_after_s=2.5)
    target = url(frontend)
    async with http.post(target, json=body(stream=True)) as holding:  # no worker: it waits in the queue
        assert holding.status == 200
        error, headers = await expect_error(http, target, 429, None, json=body())
    assert headers["retry-after"] == "3"
    assert headers["retry-after-ms"] == "2500"
    assert "x-should-retry" not in headers
    assert error["type"] == "rate_limit_error"


async def test_redis_unreachable_is_503(stack: Stack, http: aiohttp.ClientSession) -> None:
    frontend = await stack.frontend(redis_url="redis://127.0.0.1:1/0")
    error, headers = await expect_error(http, url(frontend), 503, None, json=body())
    assert error["type"] == "service_unavailable"
    assert "x-should-retry" not in headers  # a retry may find Redis back


async def test_the_server_span_honours_traceparent_and_parents_the_producer_span(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    frontend = await start_frontend(stack_settings(stack), tracer_provider=provider)
    stack.frontends.append(frontend)
    await stack.worker()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{parent}-01"}
    async with http.post(url(frontend), json=body(max_tokens=2), headers=headers) as response:
        assert response.status == 200
    spans = exporter.get_finished_spans()
    [server] = [s for s in spans if s.kind == SpanKind.SERVER]
    [producer] = [s for s in spans if s.kind == SpanKind.PRODUCER]
    assert server.name == "POST /v1/chat/completions"
    assert format(server.context.trace_id, "032x") == trace_id
    assert server.parent is not None and format(server.parent.span_id, "016x") == parent
    assert producer.parent is not None and producer.parent.span_id == server.context.span_id
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 200
    assert frontend.metrics is not None
    labels = {"door": "http", "method": "ChatCompletions", "outcome": "ok", "code": "OK"}
    assert frontend.metrics.registry.get_sample_value("mistral_serve_requests_total", labels) == 1


def stack_settings(stack: Stack) -> Any:
    from mistral_serve.frontend.settings import FrontendSettings

    return FrontendSettings(
        redis_url=stack.redis_url, grpc_host="127.0.0.1", grpc_port=0, metrics_port=None, http_port=0
    )


async def test_each_request_logs_one_line_with_its_request_id(
    door: Frontend, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mistral_serve.frontend.openai_http.telemetry")
    async with http.post(url(door), json=body(max_tokens=2)) as response:
        request_id = (await response.json())["id"].removeprefix("chatcmpl-")
    [line] = [r for r in caplog.records if r.name.endswith("openai_http.telemetry")]
    assert getattr(line, "request_id", None) == request_id
    assert line.getMessage() == "POST /v1/chat/completions 200 OK"
    entry = json.loads(JsonFormatter("frontend").format(line))
    assert entry["request_id"] == request_id


async def test_an_idempotency_key_repeat_replays_the_first_run(
    door: Frontend, http: aiohttp.ClientSession
) -> None:
    headers = {"Idempotency-Key": "order-17"}
    async with http.post(url(door), json=body("once only", max_tokens=3), headers=headers) as response:
        first = await response.json()
    async with http.post(url(door), json=body("once only", max_tokens=3), headers=headers) as response:
        again = await response.json()
    assert again["id"] == first["id"]
    assert again["choices"] == first["choices"]
    error, _ = await expect_error(
        http, url(door), 400, "Idempotency-Key", json=body("another"), headers=headers
    )
    assert "different request" in error["message"]
