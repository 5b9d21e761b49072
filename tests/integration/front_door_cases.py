"""What you get for what you send: the front door's table of bad inputs.

`test_front_door.py` sends each case to a real frontend; `docs/front-door.md` shows the same table
(`markdown_rows()` renders it; a test checks the page holds every row).
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass

import grpc
from PIL import Image

from mistral_serve.frontend.auth import key_digest
from mistral_serve.v1 import chat_pb2 as R

API_KEY = "front-door-test-key"
API_KEY_DIGEST = key_digest(API_KEY)
# The frontend the table runs against: small limits, so that every bound is cheap to cross.
CONTEXT_LENGTH = 2048
MAX_IMAGE_BYTES = 256 * 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def png(width: int, height: int, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(out, format=fmt)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", 0)
        + b"IEND"
        + struct.pack(">I", zlib.crc32(b"IEND"))
    )


SMALL_PNG = png(28, 28)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def text(t: str) -> R.ContentPart:
    return R.ContentPart(text=t)


def image(data: bytes, mime: str = "image/png") -> R.ContentPart:
    return R.ContentPart(image=R.ImageBytes(data=data, mime_type=mime))


def user(*parts: R.ContentPart) -> R.Message:
    return R.Message(role=R.ROLE_USER, content=list(parts) or [text("hi")])


def system(t: str = "be brief") -> R.Message:
    return R.Message(role=R.ROLE_SYSTEM, content=[text(t)])


def assistant(t: str = "", *calls: R.FunctionCall, prefix: bool = False) -> R.Message:
    return R.Message(role=R.ROLE_ASSISTANT, content=[text(t)] if t else [], tool_calls=calls, prefix=prefix)


def call(call_id: str = "abcDEF123", name: str = "get_weather", arguments: str = "{}") -> R.FunctionCall:
    return R.FunctionCall(id=call_id, name=name, arguments_json=arguments)


def result(call_id: str = "abcDEF123", t: str = "sunny") -> R.Message:
    return R.Message(role=R.ROLE_TOOL, tool_call_id=call_id, content=[text(t)])


def req(*messages: R.Message, **fields: object) -> R.ChatRequest:
    return R.ChatRequest(messages=list(messages), **fields)  # type: ignore[arg-type]


TOOL = R.Tool(name="get_weather", parameters_json_schema='{"type": "object"}')
ANY = R.ToolChoice(mode=R.ToolChoice.MODE_ANY)


def json_format(schema_json: str, *, name: str = "answer", strict: bool = True) -> R.ResponseFormat:
    return R.ResponseFormat(
        type=R.ResponseFormat.TYPE_JSON_SCHEMA,
        json_schema=R.JsonSchemaFormat(name=name, schema_json=schema_json, strict=strict),
    )


def sampling(**fields: object) -> R.SamplingParams:
    return R.SamplingParams(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Case:
    # What the caller sends, in words (the table's first column).
    sent: str
    # A ChatRequest (sent as ChatStreamRequest.request), or raw bytes sent as the ChatStream message.
    request: R.ChatRequest | bytes
    field: str | None
    code: grpc.StatusCode = INVALID
    # The `authorization` header; the valid key unless a case is about auth.
    authorization: str | None = f"Bearer {API_KEY}"


CASES: list[Case] = [
    # Structure
    Case("no messages", req(), "messages"),
    Case("a message with no role", req(R.Message(content=[text("x")])), "messages[0].role"),
    Case("an empty content part", req(user(R.ContentPart())), "messages[0].content[0]"),
    Case("a USER message with no content", req(R.Message(role=R.ROLE_USER)), "messages[0].content"),
    Case("SYSTEM as the last message", req(user(), system()), "messages[1].role"),
    Case("ASSISTANT last without prefix", req(user(), assistant("a")), "messages[1].role"),
    Case(
        "prefix on a message that is not last", req(assistant("a", prefix=True), user()), "messages[0].prefix"
    ),
    Case(
        "an assistant prefix with no text",
        req(user(), assistant("", call(), prefix=True)),
        "messages[1].content",
    ),
    Case("TOOL right after USER", req(user(), result()), "messages[1].role"),
    Case("a conversation of one TOOL message", req(result()), "messages[0].role"),
    Case(
        "an image in a SYSTEM message",
        req(R.Message(role=R.ROLE_SYSTEM, content=[R.ContentPart(image_url=data_url(SMALL_PNG))]), user()),
        "messages[0].content[0].image_url",
    ),
    Case(
        "an image in an ASSISTANT message",
        req(user(), R.Message(role=R.ROLE_ASSISTANT, content=[image(SMALL_PNG)], prefix=True)),
        "messages[1].content[0].image",
    ),
    Case(
        "tool_calls on a USER message",
        req(R.Message(role=R.ROLE_USER, content=[text("x")], tool_calls=[call()])),
        "messages[0].tool_calls",
    ),
    Case(
        "tool_call_id on a USER message",
        req(R.Message(role=R.ROLE_USER, content=[text("x")], tool_call_id="abcDEF123")),
        "messages[0].tool_call_id",
    ),
    # Tool calls and tools
    Case(
        "a tool call id of 8 characters",
        req(user(), assistant("", call("abcDEF12")), result("abcDEF12")),
        "messages[1].tool_calls[0].id",
    ),
    Case(
        "a tool call id with a dash",
        req(user(), assistant("", call("abc-EF123")), result("abc-EF123")),
        "messages[1].tool_calls[0].id",
    ),
    Case(
        "an OpenAI-style call id whose last 9 characters hold a dash",
        req(user(), assistant("", call("call_1234-abcdefgh")), result("call_1234-abcdefgh")),
        "messages[1].tool_calls[0].id",
    ),
    Case(
        "two OpenAI-style call ids with the same last 9 characters",
        req(
            user(),
            assistant("", call("call_aaXYZ123456"), call("call_bbXYZ123456")),
            result("call_aaXYZ123456"),
        ),
        "messages[1].tool_calls[1].id",
    ),
    Case(
        "two tool calls with one id",
        req(user(), assistant("", call(), call()), result()),
        "messages[1].tool_calls[1].id",
    ),
    Case(
        "a tool call with no name",
        req(user(), assistant("", call(name="")), result()),
        "messages[1].tool_calls[0].name",
    ),
    Case(
        "a tool call name with a space",
        req(user(), assistant("", call(name="get weather")), result()),
        "messages[1].tool_calls[0].name",
    ),
    Case(
        "tool call arguments that are not JSON",
        req(user(), assistant("", call(arguments="{city")), result()),
        "messages[1].tool_calls[0].arguments_json",
    ),
    Case(
        "a TOOL message with no tool_call_id",
        req(user(), assistant("", call()), result("")),
        "messages[2].tool_call_id",
    ),
    Case(
        "a tool result for a call never made",
        req(user(), assistant("", call()), result("zzzzzzzzz")),
        "messages[2].tool_call_id",
    ),
    Case(
        "two results for one call",
        req(user(), assistant("", call()), result(), result()),
        "messages[3].tool_call_id",
    ),
    Case(
        "a call left without a result",
        req(user(), assistant("", call(), call("xyzXYZ789")), result()),
        "messages[1].tool_calls[1]",
    ),
    Case("a tool with no name", req(user(), tools=[R.Tool()]), "tools[0].name"),
    Case("a tool name over 64 characters", req(user(), tools=[R.Tool(name="f" * 65)]), "tools[0].name"),
    Case("two tools with one name", req(user(), tools=[TOOL, TOOL]), "tools[1].name"),
    Case(
        "a tool schema that is not JSON",
        req(user(), tools=[R.Tool(name="f", parameters_json_schema="{")]),
        "tools[0].parameters_json_schema",
    ),
    Case(
        "a tool schema that is not a JSON Schema",
        req(user(), tools=[R.Tool(name="f", parameters_json_schema='{"type": 5}')]),
        "tools[0].parameters_json_schema",
    ),
    Case(
        "tool_choice FUNCTION with no name",
        req(user(), tools=[TOOL], tool_choice=R.ToolChoice(mode=R.ToolChoice.MODE_FUNCTION)),
        "tool_choice.function_name",
    ),
    Case(
        "tool_choice FUNCTION naming an unknown tool",
        req(
            user(),
            tools=[TOOL],
            tool_choice=R.ToolChoice(mode=R.ToolChoice.MODE_FUNCTION, function_name="nope"),
        ),
        "tool_choice.function_name",
    ),
    Case("tool_choice ANY with no tools", req(user(), tool_choice=ANY), "tool_choice.mode"),
    # Response format
    Case(
        "a JSON schema format whose schema is not a valid JSON Schema",
        req(user(), response_format=json_format('{"type": 5}')),
        "response_format.json_schema",
    ),
    Case(
        "a JSON schema format whose schema is a JSON array",
        req(user(), response_format=json_format("[]")),
        "response_format.json_schema",
    ),
    Case(
        "a JSON schema format with no name",
        req(user(), response_format=json_format('{"type": "object"}', name="")),
        "response_format.json_schema.name",
    ),
    Case(
        "a JSON object format with tool_choice ANY",
        req(
            user(),
            tools=[TOOL],
            tool_choice=ANY,
            response_format=R.ResponseFormat(type=R.ResponseFormat.TYPE_JSON_OBJECT),
        ),
        "response_format.type",
    ),
    # Images
    Case("11 images in one prompt", req(user(*[image(SMALL_PNG)] * 11)), "messages[0].content[10]"),
    Case(
        "an image with no bytes",
        req(user(R.ContentPart(image=R.ImageBytes(mime_type="image/png")))),
        "messages[0].content[0].image.data",
    ),
    Case(
        "an image with no MIME type",
        req(user(image(SMALL_PNG, ""))),
        "messages[0].content[0].image.mime_type",
    ),
    Case(
        "an image/bmp image",
        req(user(image(SMALL_PNG, "image/bmp"))),
        "messages[0].content[0].image.mime_type",
    ),
    Case(
        "PNG bytes labelled image/jpeg",
        req(user(image(SMALL_PNG, "image/jpeg"))),
        "messages[0].content[0].image.mime_type",
    ),
    Case(
        "bytes that are not an image",
        req(user(image(b"hello, not an image"))),
        "messages[0].content[0].image.data",
    ),
    Case(
        "a PNG with a truncated header", req(user(image(SMALL_PNG[:20]))), "messages[0].content[0].image.data"
    ),
    Case(
        f"an image over {MAX_IMAGE_BYTES} bytes",
        req(user(image(SMALL_PNG + b"\0" * MAX_IMAGE_BYTES))),
        "messages[0].content[0].image.data",
    ),
    Case("an image 12000 px wide", req(user(image(png(12000, 1)))), "messages[0].content[0].image.data"),
    Case(
        "a header claiming 9000x9000 px (81 Mpx)",
        req(user(image(png_header_only(9000, 9000)))),
        "messages[0].content[0].image.data",
    ),
    Case(
        "a data URL that is not base64",
        req(user(R.ContentPart(image_url="data:image/png,abc"))),
        "messages[0].content[0].image_url",
    ),
    Case(
        "a data URL with broken base64",
        req(user(R.ContentPart(image_url="data:image/png;base64,a$b="))),
        "messages[0].content[0].image_url",
    ),
    Case(
        "a data URL with extra parameters",
        req(user(R.ContentPart(image_url="data:image/png;charset=utf-8;base64,AAAA"))),
        "messages[0].content[0].image_url",
    ),
    Case(
        "an https image URL (URLs off)",
        req(user(R.ContentPart(image_url="https://example.com/a.png"))),
        "messages[0].content[0].image_url",
    ),
    # Sampling
    Case("max_tokens 0", req(user(), sampling=sampling(max_tokens=0)), "sampling.max_tokens"),
    Case(
        f"max_tokens {CONTEXT_LENGTH + 1} (over the whole context)",
        req(user(), sampling=sampling(max_tokens=CONTEXT_LENGTH + 1)),
        "sampling.max_tokens",
    ),
    Case("temperature 3", req(user(), sampling=sampling(temperature=3.0)), "sampling.temperature"),
    Case("temperature NaN", req(user(), sampling=sampling(temperature=float("nan"))), "sampling.temperature"),
    Case("top_p 0", req(user(), sampling=sampling(top_p=0.0)), "sampling.top_p"),
    Case(
        "presence_penalty 5",
        req(user(), sampling=sampling(presence_penalty=5.0)),
        "sampling.presence_penalty",
    ),
    Case(
        "frequency_penalty -3",
        req(user(), sampling=sampling(frequency_penalty=-3.0)),
        "sampling.frequency_penalty",
    ),
    Case("top_k -2", req(user(), sampling=sampling(top_k=-2)), "sampling.top_k"),
    Case("min_p 1.5", req(user(), sampling=sampling(min_p=1.5)), "sampling.min_p"),
    Case(
        "repetition_penalty 0",
        req(user(), sampling=sampling(repetition_penalty=0.0)),
        "sampling.repetition_penalty",
    ),
    Case(
        "min_tokens 20 with max_tokens 10",
        req(user(), sampling=sampling(min_tokens=20, max_tokens=10)),
        "sampling.min_tokens",
    ),
    Case(
        "min_tokens 2049 (over the whole context)",
        req(user(), sampling=sampling(min_tokens=CONTEXT_LENGTH + 1)),
        "sampling.min_tokens",
    ),
    Case(
        "top_logprobs 21",
        req(user(), sampling=sampling(logprobs=True, top_logprobs=21)),
        "sampling.top_logprobs",
    ),
    Case(
        "top_logprobs without logprobs",
        req(user(), sampling=sampling(top_logprobs=2)),
        "sampling.top_logprobs",
    ),
    Case(
        "17 stop sequences",
        req(user(), sampling=sampling(stop=[f"s{i}" for i in range(17)])),
        "sampling.stop",
    ),
    Case("an empty stop sequence", req(user(), sampling=sampling(stop=[""])), "sampling.stop[0]"),
    Case(
        "a stop sequence of 300 characters",
        req(user(), sampling=sampling(stop=["x" * 300])),
        "sampling.stop[0]",
    ),
    Case("a client_request_id with a space", req(user(), client_request_id="my id"), "client_request_id"),
    Case(
        "a client_request_id of 200 characters", req(user(), client_request_id="x" * 200), "client_request_id"
    ),
    # Token budget (context 2048 on the table's frontend)
    Case(
        "a prompt that fills the context, with max_tokens that alone would fit",
        req(user(text("hello " * 3000)), sampling=sampling(max_tokens=10)),
        "messages",
    ),
    Case("a text prompt longer than the context", req(user(text("hello " * 3000))), "messages"),
    Case(
        "a 1540x1540 image (3080 image tokens) in a 2048 context",
        req(user(text("what is it?"), image(png(1540, 1540)))),
        "messages",
    ),
    # Transport
    Case("bytes that are not a ChatStreamRequest", b"\x0a\x05\x12\x03\x0a\x01\xff", ""),
    # Auth
    Case("no authorization header", req(user()), None, UNAUTHENTICATED, authorization=None),
    Case("an unknown API key", req(user()), None, UNAUTHENTICATED, authorization="Bearer not-a-key"),
    Case("a key with the Basic scheme", req(user()), None, UNAUTHENTICATED, authorization=f"Basic {API_KEY}"),
]


def markdown_rows() -> list[str]:
    rows = []
    for case in CASES:
        field = "—" if case.field is None else f"`{case.field}`" if case.field else '`""` (the message)'
        rows.append(f"| {case.sent} | `{case.code.name}` | {field} |")
    return rows
