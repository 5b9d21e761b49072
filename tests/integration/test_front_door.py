"""The front door over gRPC: every bad input of the table gets its status code and field path, and a
valid request through the same door completes."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from mistral_serve.frontend.request_form import FrontDoorRequest, build_request_form
from mistral_serve.frontend.server import Frontend, start_frontend
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.frontend.token_count import TokenCounter
from mistral_serve.frontend.validation import DEFAULT_LIMITS, Limits, validate_chat_request
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from mistral_serve.worker.engine import EngineOutput, EngineRequest
from tests.engine.tiny_model import ensure_tiny_model
from tests.integration.conftest import Stack
from tests.integration.front_door_cases import (
    API_KEY,
    API_KEY_DIGEST,
    CASES,
    CONTEXT_LENGTH,
    MAX_IMAGE_BYTES,
    SMALL_PNG,
    Case,
    assistant,
    call,
    data_url,
    markdown_rows,
    result,
    text,
    user,
)
from tests.integration.test_errors import bad_request_fields
from tests.support.requests import chat, events_text
from tests.support.scripted_engine import ScriptedEngine

REPO = Path(__file__).resolve().parents[2]


@functools.cache
def tiny_token_counter() -> TokenCounter:
    """The tiny model's token counter, loaded once per test session."""
    model = ensure_tiny_model()
    return TokenCounter.from_tokenizer_file(str(model / "tekken.json"), model_name=str(model))


def form_of(request: chat_pb2.ChatRequest, limits: Limits = DEFAULT_LIMITS) -> FrontDoorRequest:
    """`request` in the form the front door queues it (no image URLs to fetch)."""
    return build_request_form(request, validate_chat_request(request, limits=limits))


@pytest.fixture
def token_counter() -> TokenCounter:
    return tiny_token_counter()


async def front_door(stack: Stack, counter: TokenCounter | None, **overrides: Any) -> Frontend:
    settings = replace(
        FrontendSettings(
            redis_url=stack.redis_url,
            grpc_host="127.0.0.1",
            grpc_port=0,
            drain_grace_s=1.0,
            health_interval_s=0.1,
            metrics_port=0,  # a free port: frontends of other tests may still hold theirs
            http_port=0,
            api_keys=(API_KEY_DIGEST,),
            context_length=CONTEXT_LENGTH,
            max_image_bytes=MAX_IMAGE_BYTES,
        ),
        **overrides,
    )
    frontend = await start_frontend(settings, counter)
    stack.frontends.append(frontend)
    return frontend


@pytest.fixture
async def door(stack: Stack, token_counter: TokenCounter) -> AsyncIterator[Frontend]:
    yield await front_door(stack, token_counter)


@pytest.mark.parametrize("case", CASES, ids=[c.sent for c in CASES])
async def test_bad_input_gets_its_code_and_field(door: Frontend, case: Case) -> None:
    metadata = [("authorization", case.authorization)] if case.authorization else []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{door.port}") as channel:
        if isinstance(case.request, bytes):
            raw: Any = channel.unary_stream("/mistral_serve.v1.ChatService/ChatStream")
            call: Any = raw(case.request, timeout=10, metadata=metadata)
            expected = case.field
        else:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            call = stub.ChatStream(
                chat_pb2.ChatStreamRequest(request=case.request), timeout=10, metadata=metadata
            )
            expected = None if case.field is None else f"request.{case.field}"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
    error = refused.value
    assert error.code() == case.code, error.details()
    fields = bad_request_fields(error)
    if expected is None:
        assert fields == []
    else:
        assert expected in fields, (fields, error.details())


def test_the_table_has_40_distinct_bad_inputs() -> None:
    assert len({c.sent for c in CASES}) == len(CASES) >= 40


def test_docs_show_the_same_table() -> None:
    page = (REPO / "docs" / "front-door.md").read_text()
    missing = [row for row in markdown_rows() if row not in page]
    assert not missing, "docs/front-door.md lacks rows:\n" + "\n".join(missing)


async def test_a_valid_request_through_the_same_door_completes(stack: Stack, door: Frontend) -> None:
    await stack.worker()
    client = stack.client(door, api_key=API_KEY)
    events = [e async for e in client.stream(chat("fine request", max_tokens=5))]
    assert events[-1].WhichOneof("event") == "finished"
    assert events_text(events) == "fine request w1 w2 w3"


async def test_health_and_reflection_need_no_key(door: Frontend) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{door.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "mistral_serve.v1.ChatService" in names


async def test_count_tokens_answers_the_budgeted_count(door: Frontend, token_counter: TokenCounter) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{door.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat("count me")
        reply = await stub.CountTokens(
            chat_pb2.CountTokensRequest(request=request),
            timeout=10,
            metadata=[("authorization", f"Bearer {API_KEY}")],
        )
    assert reply == token_counter(form_of(request))
    assert reply.prompt_tokens > 0


class RecordingEngine(ScriptedEngine):
    """The scripted engine, keeping each request as the worker received it from the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[chat_pb2.ChatRequest] = []

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.received.append(request.chat)
        return super().generate(request)


async def raw_stream(door: Frontend, request: chat_pb2.ChatRequest) -> list[chat_pb2.ChatEvent]:
    """The events of one ChatStream at the raw stub, with the table's key."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{door.port}") as channel:
        call = chat_pb2_grpc.ChatServiceStub(channel).ChatStream(
            chat_pb2.ChatStreamRequest(request=request),
            timeout=10,
            metadata=[("authorization", f"Bearer {API_KEY}")],
        )
        return [event async for event in call]


@pytest.mark.parametrize("context", [CONTEXT_LENGTH, 131072])
async def test_max_tokens_of_the_whole_context_is_clamped_not_refused(stack: Stack, context: int) -> None:
    door = await front_door(stack, tiny_token_counter(), context_length=context)
    await stack.worker()
    events = await raw_stream(door, chat("a short prompt", max_tokens=context))
    assert events[-1].WhichOneof("event") == "finished", events[-1]


async def test_the_worker_gets_the_one_form_the_front_door_built(stack: Stack, door: Frontend) -> None:
    engine = RecordingEngine()
    await stack.worker(engine)
    request = chat_pb2.ChatRequest(
        messages=[
            user(text("look"), chat_pb2.ContentPart(image_url=data_url(SMALL_PNG))),
            assistant("", call("call_7fQx2LmN0aBcDeFgHi")),
            result("call_7fQx2LmN0aBcDeFgHi"),
        ]
    )
    events = await raw_stream(door, request)
    assert events[-1].WhichOneof("event") == "finished", events[-1]
    (received,) = engine.received
    image_part = received.messages[0].content[1]
    assert image_part.WhichOneof("kind") == "image"  # the data: URL, decoded once at the front door
    assert (image_part.image.data, image_part.image.mime_type) == (SMALL_PNG, "image/png")
    assert received.messages[1].tool_calls[0].id == "aBcDeFgHi"  # vLLM's rule: the last 9 characters
    assert received.messages[2].tool_call_id == "aBcDeFgHi"
    assert received.sampling.temperature == pytest.approx(0.15)


async def test_the_worker_gets_the_prompt_ids_the_front_door_counted_for_text_not_for_images(
    stack: Stack, door: Frontend, token_counter: TokenCounter
) -> None:
    engine = ScriptedEngine()  # it keeps every request it ran
    await stack.worker(engine)
    plain = chat("count me once")
    with_image = chat_pb2.ChatRequest(
        messages=[user(text("look"), chat_pb2.ContentPart(image_url=data_url(SMALL_PNG)))]
    )
    for request in (plain, with_image):
        events = await raw_stream(door, request)
        assert events[-1].WhichOneof("event") == "finished", events[-1]
    text_run, image_run = engine.requests
    assert list(text_run.prompt_token_ids) == token_counter.encode(form_of(plain))
    assert text_run.prompt_fingerprint == token_counter.fingerprint != ""
    # The worker decodes the pixels, so it builds an image request's prompt itself.
    assert (list(image_run.prompt_token_ids), image_run.prompt_fingerprint) == ([], "")
