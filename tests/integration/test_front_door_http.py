"""The front-door table over the HTTP door: each case's ChatRequest sent as OpenAI JSON gets the HTTP
status of its gRPC code and names the same field in OpenAI's naming (translated here, independently
of the door's own mapping)."""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
import grpc
import pytest

from mistral_serve.frontend.server import Frontend
from mistral_serve.frontend.token_count import TokenCounter
from mistral_serve.v1 import chat_pb2 as R
from tests.integration.conftest import Stack
from tests.integration.front_door_cases import CASES, Case
from tests.integration.test_front_door import front_door

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401}
ROLES = {R.ROLE_SYSTEM: "system", R.ROLE_USER: "user", R.ROLE_ASSISTANT: "assistant", R.ROLE_TOOL: "tool"}
MODES = {R.ToolChoice.MODE_AUTO: "auto", R.ToolChoice.MODE_NONE: "none", R.ToolChoice.MODE_ANY: "required"}
# Cases whose ChatRequest cannot be written in OpenAI's format at all.
NO_OPENAI_FORM = {
    "a message with no role": "OpenAI messages always carry a role",
    "an empty content part": "an OpenAI content part always has a type",
    "temperature NaN": "JSON has no NaN (the door refuses such a body as not JSON)",
}
# ChatRequest path pieces → OpenAI's names for them, in order.
RENAMES = [
    (".arguments_json", ".function.arguments"),
    ("].name", "].function.name"),
    (".parameters_json_schema", ".function.parameters"),
    ("tool_choice.mode", "tool_choice"),
    ("tool_choice.function_name", "tool_choice.function.name"),
    ("sampling.", ""),
    (".image.data", ".image_url"),
    (".image.mime_type", ".image_url"),
    ("].image", "].image_url"),
    ("client_request_id", "Idempotency-Key"),
]


def openai_param(field: str) -> str | None:
    if field == "response_format.json_schema":  # OpenAI's schema sits one level down
        return "response_format.json_schema.schema"
    for old, new in RENAMES:
        field = field.replace(old, new)
    return field.replace(".image_url_url", ".image_url") or None


def part(p: R.ContentPart) -> dict[str, Any]:
    kind = p.WhichOneof("kind")
    if kind == "text":
        return {"type": "text", "text": p.text}
    if kind == "image":
        url = f"data:{p.image.mime_type};base64,{base64.b64encode(p.image.data).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}
    return {"type": "image_url", "image_url": {"url": p.image_url}}


def message(m: R.Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": ROLES[m.role], "content": [part(p) for p in m.content] or None}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.prefix:
        out["prefix"] = True
    return out


def openai_body(request: R.ChatRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "mistralai/Mistral-Small-3.2-24B-Instruct-2506"}
    body["messages"] = [message(m) for m in request.messages]
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"parameters": json.loads(t.parameters_json_schema)} if _is_json(t) else {}),
                },
            }
            for t in request.tools
        ]
    choice = request.tool_choice
    if choice.mode == R.ToolChoice.MODE_FUNCTION:
        body["tool_choice"] = {"type": "function", "function": {"name": choice.function_name}}
    elif choice.mode in MODES:
        body["tool_choice"] = MODES[choice.mode]
    if request.HasField("response_format"):
        body["response_format"] = response_format(request.response_format)
    s = request.sampling
    for name in (
        "temperature",
        "top_p",
        "max_tokens",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "top_k",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "top_logprobs",
    ):
        if s.HasField(name):
            body[name] = getattr(s, name)
    if s.logprobs:
        body["logprobs"] = True
    if s.stop:
        body["stop"] = list(s.stop)
    return body


def response_format(fmt: R.ResponseFormat) -> dict[str, Any]:
    kind = {
        R.ResponseFormat.TYPE_JSON_OBJECT: "json_object",
        R.ResponseFormat.TYPE_JSON_SCHEMA: "json_schema",
    }
    out: dict[str, Any] = {"type": kind.get(fmt.type, "text")}
    if fmt.HasField("json_schema"):
        spec = fmt.json_schema
        out["json_schema"] = {
            "name": spec.name,
            "schema": json.loads(spec.schema_json),
            "strict": spec.strict,
        }
    return out


def _is_json(tool: R.Tool) -> bool:
    try:
        return isinstance(json.loads(tool.parameters_json_schema), dict)
    except ValueError:
        return False


def raw_schema_cases(case: Case) -> bool:
    """A tool schema that is not JSON has no OpenAI form either: `parameters` is a JSON object."""
    return isinstance(case.request, R.ChatRequest) and any(
        t.parameters_json_schema and not _is_json(t) for t in case.request.tools
    )


@pytest.fixture
async def door(stack: Stack, token_counter: TokenCounter) -> Frontend:
    return await front_door(stack, token_counter)


@pytest.fixture
def token_counter() -> TokenCounter:
    from tests.integration.test_front_door import tiny_token_counter

    return tiny_token_counter()


@pytest.mark.parametrize("case", CASES, ids=[c.sent for c in CASES])
async def test_bad_input_gets_its_status_and_openai_param_over_http(door: Frontend, case: Case) -> None:
    if case.sent in NO_OPENAI_FORM:
        pytest.skip(NO_OPENAI_FORM[case.sent])
    if raw_schema_cases(case):
        pytest.skip("OpenAI's `parameters` is a JSON object, so a schema that is not JSON cannot be sent")
    headers = {"Authorization": case.authorization} if case.authorization else {}
    if isinstance(case.request, bytes):
        data = case.request
    else:
        if case.request.client_request_id:
            headers["Idempotency-Key"] = case.request.client_request_id
        data = json.dumps(openai_body(case.request)).encode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{door.http_port}/v1/chat/completions", data=data, headers=headers) as r,
    ):
        payload = await r.json()
        status = r.status
    assert status == HTTP_STATUS[case.code], payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if case.field is not None:
        assert error["param"] == openai_param(case.field), error
