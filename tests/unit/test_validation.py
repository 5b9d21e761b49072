"""Structural validation: each bad request is refused with the path of the field at fault."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from mistral_serve.common.sampling import DEFAULT_TEMPERATURE
from mistral_serve.frontend.errors import InvalidRequest
from mistral_serve.frontend.validation import validate_chat_request
from mistral_serve.v1 import chat_pb2
from tests.integration.test_front_door import form_of

R = chat_pb2


def text(t: str) -> R.ContentPart:
    return R.ContentPart(text=t)


def user(*parts: R.ContentPart) -> R.Message:
    return R.Message(role=R.ROLE_USER, content=list(parts) or [text("hi")])


def req(*messages: R.Message, **fields: object) -> R.ChatRequest:
    return R.ChatRequest(messages=list(messages), **fields)  # type: ignore[arg-type]


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), "red").save(out, format="PNG")
    return out.getvalue()


PNG = _png()
TOOL = R.Tool(name="get_weather", parameters_json_schema='{"type": "object"}')

BAD: list[tuple[str, R.ChatRequest, str]] = [
    ("no messages", req(), "messages"),
    ("role unset", req(R.Message(content=[text("x")])), "messages[0].role"),
    ("empty content part", req(user(R.ContentPart())), "messages[0].content[0]"),
    ("user without content", req(R.Message(role=R.ROLE_USER)), "messages[0].content"),
    (
        "image without data",
        req(user(R.ContentPart(image=R.ImageBytes(mime_type="image/png")))),
        "messages[0].content[0].image.data",
    ),
    (
        "image without mime",
        req(user(R.ContentPart(image=R.ImageBytes(data=b"\x89PNG")))),
        "messages[0].content[0].image.mime_type",
    ),
    (
        "image in system",
        req(R.Message(role=R.ROLE_SYSTEM, content=[R.ContentPart(image_url="https://x/y.png")]), user()),
        "messages[0].content[0].image_url",
    ),
    ("last is system", req(user(), R.Message(role=R.ROLE_SYSTEM, content=[text("s")])), "messages[1].role"),
    (
        "last is assistant",
        req(user(), R.Message(role=R.ROLE_ASSISTANT, content=[text("a")])),
        "messages[1].role",
    ),
    (
        "prefix not last",
        req(R.Message(role=R.ROLE_ASSISTANT, content=[text("a")], prefix=True), user()),
        "messages[0].prefix",
    ),
    (
        "tool without call id",
        req(user(), R.Message(role=R.ROLE_TOOL, content=[text("r")])),
        "messages[1].tool_call_id",
    ),
    (
        "tool calls on user",
        req(
            R.Message(
                role=R.ROLE_USER, content=[text("x")], tool_calls=[R.FunctionCall(id="abcdefghi", name="f")]
            )
        ),
        "messages[0].tool_calls",
    ),
    (
        "assistant call without name",
        req(user(), R.Message(role=R.ROLE_ASSISTANT, tool_calls=[R.FunctionCall(id="abcdefghi")]), user()),
        "messages[1].tool_calls[0].name",
    ),
    ("tool without name", req(user(), tools=[R.Tool()]), "tools[0].name"),
    ("tool name twice", req(user(), tools=[TOOL, TOOL]), "tools[1].name"),
    (
        "function choice unnamed",
        req(user(), tools=[TOOL], tool_choice=R.ToolChoice(mode=R.ToolChoice.MODE_FUNCTION)),
        "tool_choice.function_name",
    ),
    (
        "function choice unknown",
        req(
            user(),
            tools=[TOOL],
            tool_choice=R.ToolChoice(mode=R.ToolChoice.MODE_FUNCTION, function_name="nope"),
        ),
        "tool_choice.function_name",
    ),
    (
        "any without tools",
        req(user(), tool_choice=R.ToolChoice(mode=R.ToolChoice.MODE_ANY)),
        "tool_choice.mode",
    ),
    ("max_tokens zero", req(user(), sampling=R.SamplingParams(max_tokens=0)), "sampling.max_tokens"),
    ("temperature high", req(user(), sampling=R.SamplingParams(temperature=3.0)), "sampling.temperature"),
    ("top_p zero", req(user(), sampling=R.SamplingParams(top_p=0.0)), "sampling.top_p"),
]


@pytest.mark.parametrize(("case", "request_", "field"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_request_names_the_field(case: str, request_: R.ChatRequest, field: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        validate_chat_request(request_)
    assert field in [v.field for v in refused.value.violations], refused.value.violations


GOOD = [
    req(user()),
    req(
        R.Message(role=R.ROLE_SYSTEM, content=[text("be brief")]),
        user(R.ContentPart(image_url="data:image/png;base64," + base64.b64encode(PNG).decode())),
    ),
    req(user(), R.Message(role=R.ROLE_ASSISTANT, content=[text("Sure")], prefix=True)),
    req(
        user(),
        R.Message(
            role=R.ROLE_ASSISTANT,
            tool_calls=[R.FunctionCall(id="abcdefghi", name="get_weather", arguments_json="{}")],
        ),
        R.Message(role=R.ROLE_TOOL, tool_call_id="abcdefghi", content=[text("sunny")]),
        tools=[TOOL],
    ),
    req(
        user(),
        tools=[TOOL],
        tool_choice=R.ToolChoice(mode=R.ToolChoice.MODE_FUNCTION, function_name="get_weather"),
    ),
]


@pytest.mark.parametrize("request_", GOOD)
def test_good_request_passes(request_: R.ChatRequest) -> None:
    validate_chat_request(request_)


def test_paths_carry_the_prefix_of_the_wrapping_message() -> None:
    with pytest.raises(InvalidRequest) as refused:
        validate_chat_request(req(R.Message(content=[text("x")])), path="request.")
    assert refused.value.violations[0].field == "request.messages[0].role"


def test_defaults_fill_temperature_only_when_unset() -> None:
    assert form_of(req(user())).request.sampling.temperature == pytest.approx(DEFAULT_TEMPERATURE)
    explicit = req(user(), sampling=R.SamplingParams(temperature=0.0))
    assert form_of(explicit).request.sampling.temperature == 0.0
    assert not explicit.sampling.HasField("max_tokens")
