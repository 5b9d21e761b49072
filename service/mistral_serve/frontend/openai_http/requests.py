"""An OpenAI chat-completions body as a ChatRequest, and the pipeline's field paths in OpenAI's naming.

Only the wire format is checked here (types and shapes the ChatRequest cannot hold); every rule about
values lives in `validation` and reaches the caller through `OpenAINames.param`. Unknown fields are
ignored, as vLLM does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import orjson

from mistral_serve.v1 import chat_pb2

from ..errors import FieldViolation, InvalidRequest

ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "developer": chat_pb2.ROLE_SYSTEM,  # OpenAI's newer name for system instructions
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
    "tool": chat_pb2.ROLE_TOOL,
}
TOOL_CHOICES = {
    "auto": chat_pb2.ToolChoice.MODE_AUTO,
    "none": chat_pb2.ToolChoice.MODE_NONE,
    "required": chat_pb2.ToolChoice.MODE_ANY,
}
RESPONSE_FORMATS = {
    "text": chat_pb2.ResponseFormat.TYPE_TEXT,
    "json_object": chat_pb2.ResponseFormat.TYPE_JSON_OBJECT,
    "json_schema": chat_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
}
UINT32_MAX = 2**32 - 1
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
# Sampling fields that are plain numbers on both sides, by one name (min_p and repetition_penalty
# are vLLM's extra parameters, which its OpenAI server accepts in the body too).
FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty")
# Integer sampling fields, by one name, with the range their proto field holds (the table's bounds
# are checked after, by validation): top_k and min_tokens are vLLM's extras.
INTEGERS = {"top_k": INT32, "min_tokens": (0, UINT32_MAX), "top_logprobs": (0, UINT32_MAX)}


@dataclass
class OpenAINames:
    """How this body named what the ChatRequest holds, to name a pipeline field path back."""

    # Messages whose content was one string: their content[0] is `messages[i].content`.
    string_content: set[int] = field(default_factory=set)
    max_tokens: str = "max_tokens"
    stop_was_string: bool = False

    def param(self, path: str) -> str | None:
        """OpenAI's name for a ChatRequest field path (`messages[0].content[1].image_url`)."""
        if not path:
            return None
        for pattern, name in _PATHS:
            match = pattern.fullmatch(path)
            if match:
                return name(self, match)
        return path


Naming: TypeAlias = Callable[[OpenAINames, re.Match[str]], str]


def _content(names: OpenAINames, m: re.Match[str]) -> str:
    i = int(m[1])
    if i in names.string_content:
        return f"messages[{i}].content"
    # Data URLs may reach the pipeline as image bytes; the caller sent them as image_url.
    rest = ".image_url" if m[3].startswith(".image") else ""
    return f"messages[{i}].content[{m[2]}]{rest}"


_PATHS: list[tuple[re.Pattern[str], Naming]] = [
    (re.compile(r"messages\[(\d+)\]\.content\[(\d+)\](.*)"), _content),
    (re.compile(r"(messages\[\d+\]\.tool_calls\[\d+\])\.name"), lambda n, m: f"{m[1]}.function.name"),
    (
        re.compile(r"(messages\[\d+\]\.tool_calls\[\d+\])\.arguments_json"),
        lambda n, m: f"{m[1]}.function.arguments",
    ),
    (re.compile(r"(tools\[\d+\])\.name"), lambda n, m: f"{m[1]}.function.name"),
    (re.compile(r"(tools\[\d+\])\.parameters_json_schema"), lambda n, m: f"{m[1]}.function.parameters"),
    (re.compile(r"tool_choice\.mode"), lambda n, m: "tool_choice"),
    (re.compile(r"tool_choice\.function_name"), lambda n, m: "tool_choice.function.name"),
    (re.compile(r"response_format\.json_schema"), lambda n, m: "response_format.json_schema.schema"),
    (re.compile(r"sampling\.max_tokens"), lambda n, m: n.max_tokens),
    (re.compile(r"sampling\.stop\[(\d+)\]"), lambda n, m: "stop" if n.stop_was_string else f"stop[{m[1]}]"),
    (re.compile(r"sampling\.(\w+)"), lambda n, m: m[1]),
    (re.compile(r"client_request_id"), lambda n, m: "Idempotency-Key"),
    (re.compile(r"last_sequence"), lambda n, m: "Last-Event-ID"),
]


@dataclass
class ChatCompletion:
    """What one POST /v1/chat/completions asks for."""

    request: chat_pb2.ChatRequest
    names: OpenAINames
    model: str | None
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> Any:
    """The body as JSON; InvalidRequest (the whole body) when it is not JSON.

    orjson is strict where Python's json is not: no NaN or Infinity, no escapes that decode to lone
    surrogates (text no protobuf string can hold), nesting bounded at 1024.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest([FieldViolation("", f"the body is not JSON: {exc}")]) from None


class _Reader:
    """Collects the wire-format problems of one body, each under its OpenAI name."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def bad(self, where: str, description: str) -> None:
        self.violations.append(FieldViolation(where, description))

    def obj(self, value: Any, where: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.bad(where, f"must be an object, not {_kind(value)}")
        return None

    def string(self, value: Any, where: str) -> str | None:
        if isinstance(value, str):
            return value
        self.bad(where, f"must be a string, not {_kind(value)}")
        return None

    def number(self, value: Any, where: str) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.bad(where, f"must be a number, not {_kind(value)}")
            return None
        try:
            return float(value)
        except OverflowError:
            return math.inf

    def boolean(self, value: Any, where: str) -> bool | None:
        if isinstance(value, bool):
            return value
        self.bad(where, f"must be a boolean, not {_kind(value)}")
        return None

    def integer(self, value: Any, where: str, low: int, high: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(where, f"must be an integer, not {_kind(value)}")
            return None
        if not low <= value <= high:
            self.bad(where, f"must be within [{low}, {high}]")
            return None
        return value


def to_chat_completion(
    body: Any, *, idempotency_key: str | None = None, context_length: int = UINT32_MAX
) -> ChatCompletion:
    """The ChatRequest `body` describes; InvalidRequest naming every field of the wrong shape."""
    r = _Reader()
    top = r.obj(body, "")
    if top is None:
        raise InvalidRequest(r.violations)
    names = OpenAINames()
    request = chat_pb2.ChatRequest()
    messages = top.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            _message(r, message, i, request.messages.add(), names)
    elif messages is not None:
        r.bad("messages", f"must be an array, not {_kind(messages)}")
    _tools(r, top, request)
    _response_format(r, top.get("response_format"), request.response_format)
    _sampling(r, top, request, names, context_length)
    n = top.get("n")
    if n is not None and n != 1:
        r.bad("n", "only n=1 is supported: send one request per completion")
    model = top.get("model")
    if model is not None:
        r.string(model, "model")
    stream = top.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        r.bad("stream", f"must be a boolean, not {_kind(stream)}")
    include_usage = False
    options = top.get("stream_options")
    if options is not None and (opts := r.obj(options, "stream_options")) is not None:
        include_usage = opts.get("include_usage") is True
    priority = top.get("priority")
    if priority is not None and (value := r.integer(priority, "priority", -(2**31), 2**31 - 1)) is not None:
        request.priority = value
    if idempotency_key is not None:
        request.client_request_id = idempotency_key
    if r.violations:
        raise InvalidRequest(r.violations)
    return ChatCompletion(
        request, names, model if isinstance(model, str) else None, bool(stream), include_usage
    )


def _message(r: _Reader, value: Any, i: int, out: chat_pb2.Message, names: OpenAINames) -> None:
    where = f"messages[{i}]"
    message = r.obj(value, where)
    if message is None:
        return
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        r.bad(f"{where}.role", f"must be one of {', '.join(ROLES)}")
    else:
        out.role = ROLES[role]
    content = message.get("content")
    if isinstance(content, str):
        names.string_content.add(i)
        out.content.add(text=content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            _part(r, part, f"{where}.content[{j}]", out.content.add())
    elif content is not None:
        r.bad(f"{where}.content", f"must be a string or an array of parts, not {_kind(content)}")
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for k, call in enumerate(calls):
            _call(r, call, f"{where}.tool_calls[{k}]", out.tool_calls.add())
    elif calls is not None:
        r.bad(f"{where}.tool_calls", f"must be an array, not {_kind(calls)}")
    call_id = message.get("tool_call_id")
    if call_id is not None and (text := r.string(call_id, f"{where}.tool_call_id")) is not None:
        out.tool_call_id = text
    prefix = message.get("prefix")  # Mistral's extension: continue this assistant text
    if prefix is not None:
        if isinstance(prefix, bool):
            out.prefix = prefix
        else:
            r.bad(f"{where}.prefix", f"must be a boolean, not {_kind(prefix)}")


def _part(r: _Reader, value: Any, where: str, out: chat_pb2.ContentPart) -> None:
    part = r.obj(value, where)
    if part is None:
        return
    kind = part.get("type")
    if kind == "text":
        text = r.string(part.get("text"), f"{where}.text")
        if text is not None:
            out.text = text
    elif kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(url, str):
            out.image_url = url
        else:
            r.bad(f"{where}.image_url", "must be an object with a string `url`")
    else:
        r.bad(f"{where}.type", "must be text or image_url")


def _call(r: _Reader, value: Any, where: str, out: chat_pb2.FunctionCall) -> None:
    call = r.obj(value, where)
    if call is None:
        return
    if (call_id := r.string(call.get("id"), f"{where}.id")) is not None:
        out.id = call_id
    function = r.obj(call.get("function"), f"{where}.function")
    if function is None:
        return
    if (name := r.string(function.get("name"), f"{where}.function.name")) is not None:
        out.name = name
    arguments = function.get("arguments", "{}")
    if (text := r.string(arguments, f"{where}.function.arguments")) is not None:
        out.arguments_json = text


def _tools(r: _Reader, top: dict[str, Any], request: chat_pb2.ChatRequest) -> None:
    tools = top.get("tools")
    if isinstance(tools, list):
        for i, value in enumerate(tools):
            where = f"tools[{i}]"
            out = request.tools.add()
            tool = r.obj(value, where)
            if tool is None:
                continue
            if tool.get("type", "function") != "function":
                r.bad(f"{where}.type", "must be function")
            function = r.obj(tool.get("function"), f"{where}.function")
            if function is None:
                continue
            if (name := r.string(function.get("name"), f"{where}.function.name")) is not None:
                out.name = name
            description = function.get("description")
            if description is not None and (text := r.string(description, f"{where}.function.description")):
                out.description = text
            parameters = function.get("parameters")
            if parameters is not None and r.obj(parameters, f"{where}.function.parameters") is not None:
                out.parameters_json_schema = json.dumps(parameters)
    elif tools is not None:
        r.bad("tools", f"must be an array, not {_kind(tools)}")
    choice = top.get("tool_choice")
    if isinstance(choice, str):
        if choice in TOOL_CHOICES:
            request.tool_choice.mode = TOOL_CHOICES[choice]
        else:
            r.bad("tool_choice", "must be auto, none, required or a named function")
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            request.tool_choice.mode = chat_pb2.ToolChoice.MODE_FUNCTION
            request.tool_choice.function_name = name
        else:
            r.bad("tool_choice.function.name", "a named tool choice needs the function's name")
    elif choice is not None:
        r.bad("tool_choice", "must be auto, none, required or a named function")
    parallel = top.get("parallel_tool_calls")
    if isinstance(parallel, bool):
        request.parallel_tool_calls = parallel
    elif parallel is not None:
        r.bad("parallel_tool_calls", f"must be a boolean, not {_kind(parallel)}")


def _response_format(r: _Reader, value: Any, out: chat_pb2.ResponseFormat) -> None:
    """OpenAI's `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` and the others."""
    if value is None or (fmt := r.obj(value, "response_format")) is None:
        return
    kind = fmt.get("type")
    if kind not in RESPONSE_FORMATS:
        r.bad("response_format.type", "must be text, json_object or json_schema")
        return
    out.type = RESPONSE_FORMATS[kind]
    if kind != "json_schema":
        return
    spec = r.obj(fmt.get("json_schema"), "response_format.json_schema")
    if spec is None:
        return
    if (name := r.string(spec.get("name"), "response_format.json_schema.name")) is not None:
        out.json_schema.name = name
    description = spec.get("description")
    if description is not None and (text := r.string(description, "response_format.json_schema.description")):
        out.json_schema.description = text
    schema = spec.get("schema")
    if schema is not None and r.obj(schema, "response_format.json_schema.schema") is not None:
        out.json_schema.schema_json = json.dumps(schema)
    strict = spec.get("strict", False)
    if isinstance(strict, bool):
        out.json_schema.strict = strict
    elif strict is not None:
        r.bad("response_format.json_schema.strict", f"must be a boolean, not {_kind(strict)}")


def _sampling(
    r: _Reader, top: dict[str, Any], request: chat_pb2.ChatRequest, names: OpenAINames, context_length: int
) -> None:
    s = request.sampling
    for name in FLOATS:
        value = top.get(name)
        if value is not None and (number := r.number(value, name)) is not None:
            setattr(s, name, number)
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are sent
        value = top.get(key)
        if value is None:
            continue
        names.max_tokens = key
        if isinstance(value, int) and not isinstance(value, bool) and value > UINT32_MAX:
            r.bad(key, f"{key} is {value}; the context holds {context_length} tokens, prompt included")
        elif (count := r.integer(value, key, 0, UINT32_MAX)) is not None:
            s.max_tokens = count
        break
    stop = top.get("stop")
    if isinstance(stop, str):
        names.stop_was_string = True
        s.stop.append(stop)
    elif isinstance(stop, list):
        for i, item in enumerate(stop):
            if (text := r.string(item, f"stop[{i}]")) is not None:
                s.stop.append(text)
    elif stop is not None:
        r.bad("stop", f"must be a string or an array of strings, not {_kind(stop)}")
    seed = top.get("seed")
    if seed is not None and (value := r.integer(seed, "seed", *INT64)) is not None:
        s.seed = value
    for name, (low, high) in INTEGERS.items():
        value = top.get(name)
        if value is not None and (number := r.integer(value, name, low, high)) is not None:
            setattr(s, name, number)
    logprobs = top.get("logprobs")
    if logprobs is not None and (on := r.boolean(logprobs, "logprobs")) is not None:
        s.logprobs = on
    # Our extension: false sends no system prompt where the service would add the model's default.
    switch = top.get("default_system_prompt")
    if switch is not None and (on := r.boolean(switch, "default_system_prompt")) is not None:
        request.default_system_prompt = on


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}.get(
        type(value), "an object"
    )
