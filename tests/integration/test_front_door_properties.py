"""Property tests: valid requests mutated at random never get INTERNAL, never crash or hang the
frontend, and a valid request sent alongside still completes."""

from __future__ import annotations

import asyncio
import math

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_serve.client import ChatClient
from mistral_serve.frontend.errors import InvalidRequest
from mistral_serve.frontend.validation import validate_chat_request
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from tests.integration.conftest import Stack
from tests.integration.front_door_cases import (
    SMALL_PNG,
    TOOL,
    assistant,
    call,
    data_url,
    image,
    result,
    text,
    user,
)
from tests.integration.test_front_door import front_door, tiny_token_counter
from tests.support.requests import chat, events_text

BASE = chat_pb2.ChatRequest(
    messages=[
        chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content=[text("be brief")]),
        user(text("weather?"), image(SMALL_PNG)),
        assistant("", call()),
        result(),
        user(text("and tomorrow?"), chat_pb2.ContentPart(image_url=data_url(SMALL_PNG))),
    ],
    tools=[TOOL],
    sampling=chat_pb2.SamplingParams(temperature=0.3, max_tokens=8, stop=["\n\n"]),
    client_request_id="",
)

# Values chosen to sit on and around every bound the front door knows.
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", "abcDEF123", "get_weather", "{}", "{", "null"]))
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1.0, 2.0, -2.0])
)
blobs = st.one_of(st.binary(max_size=64), st.just(SMALL_PNG), st.just(SMALL_PNG[:30]))


@st.composite
def mutated(draw: st.DrawFn) -> chat_pb2.ChatRequest:
    request = chat_pb2.ChatRequest()
    request.CopyFrom(BASE)
    for _ in range(draw(st.integers(1, 4))):
        mutate = draw(st.sampled_from(MUTATIONS))
        mutate(draw, request)
    return request


def _message(draw: st.DrawFn, r: chat_pb2.ChatRequest) -> chat_pb2.Message:
    if not r.messages:
        r.messages.add()
    return r.messages[draw(st.integers(0, len(r.messages) - 1))]


def m_role(draw: st.DrawFn, r: chat_pb2.ChatRequest) -> None:
    _message(draw, r).role = draw(st.integers(0, 6))  # type: ignore[assignment]


def m_drop_message(draw: st.DrawFn, r: chat_pb2.ChatRequest) -> None:
    if r.messages:
        del r.messages[draw(st.integers(0, len(r.messages) - 1))]


def m_swap_messages(draw: st.DrawFn, r: chat_pb2.ChatRequest) -> None:
    if len(r.messages) > 1:
        i, j = draw(st.integers(0, len(r.messages) - 1)), draw(st.integers(0, len(r.messages) - 1))
        a, b = chat_pb2.Message(), chat_pb2.Message()
        a.CopyFrom(r.messages[i])
        b.CopyFrom(r.messages[j])
        r.messages[i].CopyFrom(b)
        r.messages[j].CopyFrom(a)


def m_part(draw: st.DrawFn, r: chat_pb2.ChatRequest) -> None:
    message = _message(draw, r)
    kind = draw(st.sampled_from(["text", "image", "url", "empty", "many"]))
    if kind == "text":
        message.content.add(text=draw(texts))
    elif kind == "image":
        message.content.add(image=chat_pb2.ImageBytes(data=draw(blobs), mime_type=draw(texts)))
    elif kind == "url":
        message.content.add(
            image_url=draw(st.sampled_from(["data:", "data:image/png;base64,", "https://x/y"])) + draw(texts)
        )
    elif kind == "empty":
        message.content.add()
    else:
        for _ in range(draw(st.integers(9, 12))):
            message.content.add(image=chat_pb2.ImageBytes(data=SMALL_PNG, mime_type="image/png"))


def m_calls(draw: st.DrawFn, r: chat_pb2.ChatRequest) -> None:
    message = _message(draw, r)
    message.tool_calls.add(id=draw(texts), name=draw(texts), arguments_json=draw(texts))
    message.tool_call_id = draw(texts)
    message.prefix = draw(st.booleans())


def m_tools(draw: st.DrawFn, r: chat_pb2.ChatRequest) -> None:
    r.tools.add(
        name=draw(texts), parameters_json_schema=draw(st.sampled_from(['{"type": 5}', "[]", "{", "{}"]))
    )
    r.tool_choice.mode = draw(st.integers(0, 6))  # type: ignore[assignment]
    r.tool_choice.function_name = draw(texts)


def m_sampling(draw: st.DrawFn, r: chat_pb2.ChatRequest) -> None:
    s = r.sampling
    name = draw(st.sampled_from(["temperature", "top_p", "presence_penalty", "frequency_penalty"]))
    setattr(s, name, draw(floats))
    s.max_tokens = draw(st.sampled_from([0, 1, 8, 2**31, 2**32 - 1]))
    s.stop.extend(draw(st.lists(texts, max_size=20)))


def m_scalars(draw: st.DrawFn, r: chat_pb2.ChatRequest) -> None:
    r.client_request_id = draw(texts)
    r.priority = draw(st.integers(-(2**31), 2**31 - 1))


MUTATIONS = [m_role, m_drop_message, m_swap_messages, m_part, m_calls, m_tools, m_sampling, m_scalars]


@settings(max_examples=200, deadline=None)
@given(mutated())
def test_validation_refuses_or_accepts_and_never_raises_anything_else(request: chat_pb2.ChatRequest) -> None:
    try:
        validate_chat_request(request)
    except InvalidRequest as refused:
        assert refused.violations
        assert all(v.field and v.description for v in refused.violations)


def test_the_unmutated_request_is_valid() -> None:
    validate_chat_request(BASE)
    assert not math.isnan(BASE.sampling.temperature)


async def test_mutated_requests_over_grpc_never_get_internal_and_a_valid_one_completes(
    stack: Stack,
) -> None:
    # With the token counter: mistral_common's validator and encoder see every mutant that passes.
    frontend = await front_door(stack, tiny_token_counter(), api_keys=(), context_length=131072)
    await stack.worker()
    good = stack.client(frontend)
    examples: list[chat_pb2.ChatRequest] = []

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(mutated())
    def collect(request: chat_pb2.ChatRequest) -> None:
        examples.append(request)

    collect()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def send(request: chat_pb2.ChatRequest) -> grpc.StatusCode:
            try:
                async for _ in stub.ChatStream(chat_pb2.ChatStreamRequest(request=request), timeout=20):
                    pass
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        codes, events = await asyncio.gather(
            asyncio.gather(*(send(r) for r in examples)),
            _collect(good, "still served"),
        )
    assert grpc.StatusCode.INTERNAL not in codes
    assert grpc.StatusCode.UNKNOWN not in codes
    assert grpc.StatusCode.DEADLINE_EXCEEDED not in codes  # no hang
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    assert events_text(events).startswith("still served")


async def _collect(client: ChatClient, prompt: str) -> list[chat_pb2.ChatEvent]:
    return [e async for e in client.stream(chat(prompt))]
