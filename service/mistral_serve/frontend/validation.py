"""Every check of a ChatRequest that needs no I/O; the images it checks are handed to the request form.

Every check names the offending field by its path, so a caller can fix it without guessing. The
conversation rules are the model's, as `mistral_common`'s v11 request validator applies them (role
order, tool call ids, tool results matching calls, function names, draft-7 tool schemas, prefix
only last); they are checked here one field at a time because that validator stops at the first
problem and names no field. The token counter runs `mistral_common`'s own validator as well, as a
backstop, when a tokenizer is configured. The rules both processes rely on (call ids, function names,
the context budget) live in `mistral_serve.common.contract`, the sampling bounds in its table
(`mistral_serve.common.sampling`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mistral_common.utils.json_utils import validate_json_schema_by_draft7

from mistral_serve.common import sampling
from mistral_serve.common.contract import (
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_MAX_IMAGES_PER_PROMPT,
    FUNCTION_NAME,
    FUNCTION_NAME_RULE,
    TOOL_CALL_ID,
    BudgetProblem,
    max_tokens_problem,
    model_tool_call_id,
    new_tokens_allowed,
)
from mistral_serve.v1 import chat_pb2

from .errors import FieldViolation, InvalidRequest
from .images import CheckedImage, ImageLimits, ImageProblem, check_image, parse_data_url
from .settings import FrontendSettings

Role = chat_pb2.Role
Mode = chat_pb2.ToolChoice.Mode
Format = chat_pb2.ResponseFormat
# Where an image sits in a request: (message index, content part index).
PartIndex = tuple[int, int]

TOOL_CALL_ID_RULE = "a tool call id is 9 characters of [a-zA-Z0-9] (of a longer id, its last 9)"
CLIENT_REQUEST_ID = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
MAX_URL_CHARS = 2048

_ROLE_NAMES = {
    Role.ROLE_SYSTEM: "SYSTEM",
    Role.ROLE_USER: "USER",
    Role.ROLE_ASSISTANT: "ASSISTANT",
    Role.ROLE_TOOL: "TOOL",
}
# Which role may follow which, as mistral_common orders a conversation.
_MAY_FOLLOW = {
    Role.ROLE_SYSTEM: {Role.ROLE_USER, Role.ROLE_ASSISTANT, Role.ROLE_SYSTEM},
    Role.ROLE_USER: {Role.ROLE_ASSISTANT, Role.ROLE_SYSTEM, Role.ROLE_USER},
    Role.ROLE_ASSISTANT: {Role.ROLE_ASSISTANT, Role.ROLE_USER, Role.ROLE_TOOL},
    Role.ROLE_TOOL: {Role.ROLE_ASSISTANT, Role.ROLE_TOOL, Role.ROLE_USER},
}


@dataclass(frozen=True, slots=True)
class Limits:
    """The front door's bounds; `from_settings` takes them from the frontend's settings."""

    context_length: int = DEFAULT_CONTEXT_LENGTH
    max_images: int = DEFAULT_MAX_IMAGES_PER_PROMPT
    image: ImageLimits = field(default_factory=ImageLimits)
    image_urls_enabled: bool = False
    image_url_allowed_hosts: tuple[str, ...] = ()
    image_url_allow_http: bool = False
    max_stop_sequences: int = 16
    max_stop_sequence_chars: int = 256
    max_client_request_id_chars: int = 128

    @classmethod
    def from_settings(cls, s: FrontendSettings) -> Limits:
        return cls(
            context_length=s.context_length,
            max_images=s.max_images_per_prompt,
            image=ImageLimits(s.max_image_bytes, s.max_image_side_px, s.max_image_pixels),
            image_urls_enabled=s.image_urls_enabled,
            image_url_allowed_hosts=s.image_url_allowed_hosts,
            image_url_allow_http=s.image_url_allow_http,
            max_stop_sequences=s.max_stop_sequences,
            max_stop_sequence_chars=s.max_stop_sequence_chars,
            max_client_request_id_chars=s.max_client_request_id_chars,
        )


DEFAULT_LIMITS = Limits()


def validate_chat_request(
    request: chat_pb2.ChatRequest, *, path: str = "", limits: Limits = DEFAULT_LIMITS
) -> dict[PartIndex, CheckedImage]:
    """Raise InvalidRequest listing every problem of `request` that needs no I/O to find.

    Returns the images it checked (inline bytes, and data: URLs decoded), by where they sit: the
    request form takes them from here, so no image is decoded or its header read twice.
    """
    violations: list[FieldViolation] = []
    images: dict[PartIndex, CheckedImage] = {}
    violations += _check_messages(request, path, limits, images)
    violations += _check_tools(request, path)
    violations += _check_response_format(request, path)
    violations += _check_sampling(request, path, limits)
    violations += _check_client_request_id(request, path, limits)
    if violations:
        raise InvalidRequest(violations)
    return images


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether `host` is on the allow-list: exact names, or `*.example.com` for its subdomains."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1:
            return True
        if host == entry:
            return True
    return False


def _check_messages(
    request: chat_pb2.ChatRequest, path: str, limits: Limits, checked: dict[PartIndex, CheckedImage]
) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    messages = request.messages
    if not messages:
        return [FieldViolation(f"{path}messages", "at least one message is required")]
    images = 0
    for i, message in enumerate(messages):
        where = f"{path}messages[{i}]"
        out += _check_message(message, where, is_last=i == len(messages) - 1)
        for j, part in enumerate(message.content):
            if part.WhichOneof("kind") in ("image", "image_url") and message.role == Role.ROLE_USER:
                images += 1
                if images > limits.max_images:
                    out.append(
                        FieldViolation(
                            f"{where}.content[{j}]",
                            f"this is image {images} of the prompt; at most {limits.max_images} are accepted",
                        )
                    )
                else:
                    problems, image = _check_image_part(part, f"{where}.content[{j}]", limits)
                    out += problems
                    if image is not None:
                        checked[(i, j)] = image
    last = messages[-1]
    last_role = f"{path}messages[{len(messages) - 1}].role"
    if last.role == Role.ROLE_ASSISTANT and not last.prefix:
        out.append(
            FieldViolation(
                last_role,
                "the last message must be USER or TOOL, or ASSISTANT with prefix=true to continue it",
            )
        )
    if last.role == Role.ROLE_SYSTEM:
        out.append(FieldViolation(last_role, "the last message cannot be SYSTEM"))
    out += _check_order(messages, path)
    out += _check_tool_results(messages, path)
    return out


def _check_message(message: chat_pb2.Message, where: str, *, is_last: bool) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if message.role not in _ROLE_NAMES:
        return [FieldViolation(f"{where}.role", "role must be SYSTEM, USER, ASSISTANT or TOOL")]
    for j, part in enumerate(message.content):
        out += _check_part(part, f"{where}.content[{j}]", message.role)
    if message.role == Role.ROLE_ASSISTANT:
        if not message.content and not message.tool_calls:
            out.append(FieldViolation(f"{where}.content", "an assistant message needs content or tool_calls"))
        for k, call in enumerate(message.tool_calls):
            out += _check_call(call, f"{where}.tool_calls[{k}]")
        ids = [model_tool_call_id(c.id) for c in message.tool_calls]
        for k, call_id in enumerate(ids):
            if call_id and call_id in ids[:k]:
                out.append(
                    FieldViolation(f"{where}.tool_calls[{k}].id", f"call id {call_id!r} is used twice")
                )
    elif not message.content:
        out.append(FieldViolation(f"{where}.content", "content is required"))
    if message.role != Role.ROLE_ASSISTANT and message.tool_calls:
        out.append(FieldViolation(f"{where}.tool_calls", "only ASSISTANT messages carry tool_calls"))
    if message.role == Role.ROLE_TOOL:
        if not message.tool_call_id:
            out.append(
                FieldViolation(f"{where}.tool_call_id", "a TOOL message must name the call it answers")
            )
        elif not TOOL_CALL_ID.fullmatch(model_tool_call_id(message.tool_call_id)):
            out.append(FieldViolation(f"{where}.tool_call_id", TOOL_CALL_ID_RULE))
    if message.role != Role.ROLE_TOOL and message.tool_call_id:
        out.append(FieldViolation(f"{where}.tool_call_id", "only TOOL messages carry tool_call_id"))
    if message.prefix:
        if not (message.role == Role.ROLE_ASSISTANT and is_last):
            out.append(
                FieldViolation(f"{where}.prefix", "prefix is only allowed on the last, ASSISTANT message")
            )
        elif not any(p.WhichOneof("kind") == "text" and p.text for p in message.content):
            out.append(FieldViolation(f"{where}.content", "an assistant prefix needs the text to continue"))
    return out


def _check_call(call: chat_pb2.FunctionCall, where: str) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if not call.id:
        out.append(FieldViolation(f"{where}.id", "a tool call needs an id"))
    elif not TOOL_CALL_ID.fullmatch(model_tool_call_id(call.id)):
        out.append(FieldViolation(f"{where}.id", TOOL_CALL_ID_RULE))
    if not call.name:
        out.append(FieldViolation(f"{where}.name", "a tool call needs a name"))
    elif not FUNCTION_NAME.fullmatch(call.name):
        out.append(FieldViolation(f"{where}.name", FUNCTION_NAME_RULE))
    if call.arguments_json:
        problem = _json_object_problem(call.arguments_json)
        if problem:
            out.append(
                FieldViolation(f"{where}.arguments_json", f"arguments must be a JSON object: {problem}")
            )
    return out


def _check_part(part: chat_pb2.ContentPart, where: str, role: int) -> list[FieldViolation]:
    kind = part.WhichOneof("kind")
    if kind is None:
        return [FieldViolation(where, "a content part must set text, image or image_url")]
    if kind == "text":
        return []
    if role != Role.ROLE_USER:
        return [FieldViolation(f"{where}.{kind}", "images are only allowed in USER messages")]
    return []


_Checked = tuple[list[FieldViolation], CheckedImage | None]


def _check_image_part(part: chat_pb2.ContentPart, where: str, limits: Limits) -> _Checked:
    """The part's problems, and the image itself when it is inline bytes or a data: URL that passed."""
    if limits.max_images == 0:
        return [FieldViolation(where, "this service does not accept images")], None
    if part.WhichOneof("kind") == "image":
        out = []
        if not part.image.data:
            out.append(FieldViolation(f"{where}.image.data", "image data is empty"))
        if not part.image.mime_type:
            out.append(FieldViolation(f"{where}.image.mime_type", "the image's MIME type is required"))
        if out:
            return out, None
        try:
            return [], check_image(part.image.data, part.image.mime_type, limits.image)
        except ImageProblem as problem:
            return [FieldViolation(f"{where}.image.{problem.field}", problem.description)], None
    return _check_image_url(part.image_url, f"{where}.image_url", limits)


def _check_image_url(url: str, where: str, limits: Limits) -> _Checked:
    if not url:
        return [FieldViolation(where, "image_url is empty")], None
    if url.startswith("data:"):
        try:
            mime_type, data = parse_data_url(url, limits.image)
            return [], check_image(data, mime_type, limits.image)
        except ImageProblem as bad:
            return [FieldViolation(where, bad.description)], None
    if not limits.image_urls_enabled:
        return [
            FieldViolation(
                where, "image URLs are off on this service; send the image as bytes or as a data: URL"
            )
        ], None
    problem = url_problem(url, limits.image_url_allowed_hosts, allow_http=limits.image_url_allow_http)
    return ([FieldViolation(where, problem)] if problem else []), None


def url_problem(url: str, allowed_hosts: tuple[str, ...], *, allow_http: bool) -> str | None:
    """Why an image URL may not be fetched (before any DNS lookup), or None."""
    if len(url) > MAX_URL_CHARS:
        return f"the URL is {len(url)} characters; at most {MAX_URL_CHARS} are accepted"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"the URL cannot be parsed: {exc}"
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        return f"the URL's scheme must be {' or '.join(schemes)}"
    if parts.username is not None or parts.password is not None:
        return "the URL may not carry credentials"
    host = parts.hostname
    if not host:
        return "the URL has no host"
    if not host_allowed(host, allowed_hosts):
        return f"host {host!r} is not on this service's image host allow-list"
    if port == 0:
        return "the URL's port is 0"
    return None


def _check_order(msgs: Sequence[chat_pb2.Message], path: str) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if len(msgs) == 1 and msgs[0].role not in (Role.ROLE_USER, Role.ROLE_SYSTEM, Role.ROLE_UNSPECIFIED):
        out.append(FieldViolation(f"{path}messages[0].role", "a conversation starts with USER or SYSTEM"))
    for i in range(1, len(msgs)):
        before, role = msgs[i - 1].role, msgs[i].role
        if before in _MAY_FOLLOW and role in _ROLE_NAMES and role not in _MAY_FOLLOW[before]:
            out.append(
                FieldViolation(
                    f"{path}messages[{i}].role",
                    f"{_ROLE_NAMES[role]} cannot follow {_ROLE_NAMES[before]}"
                    + (
                        " (TOOL results follow the ASSISTANT message that made the calls)"
                        if role == Role.ROLE_TOOL
                        else ""
                    ),
                )
            )
    return out


def _check_tool_results(messages: Sequence[chat_pb2.Message], path: str) -> list[FieldViolation]:
    """Each TOOL message answers a call of the ASSISTANT message before it, once; all calls answered."""
    out: list[FieldViolation] = []
    pending: dict[str, str] = {}  # call id → path of the call, for the open ASSISTANT message
    answered: set[str] = set()
    for i, message in enumerate(messages):
        where = f"{path}messages[{i}]"
        if message.role == Role.ROLE_TOOL and message.tool_call_id:
            call_id = model_tool_call_id(message.tool_call_id)
            if call_id in answered:
                out.append(FieldViolation(f"{where}.tool_call_id", f"call {call_id!r} already has a result"))
            elif call_id not in pending:
                out.append(
                    FieldViolation(
                        f"{where}.tool_call_id",
                        f"{call_id!r} is not a call of the ASSISTANT message these results answer",
                    )
                )
            else:
                answered.add(call_id)
        elif message.role == Role.ROLE_ASSISTANT:
            out += _unanswered(pending, answered)
            pending = {
                model_tool_call_id(c.id): f"{where}.tool_calls[{k}]"
                for k, c in enumerate(message.tool_calls)
                if c.id
            }
            answered = set()
    if messages[-1].role == Role.ROLE_ASSISTANT:
        return out  # its calls are the ones being made; the last-message rule speaks for it
    return out + _unanswered(pending, answered)


def _unanswered(pending: dict[str, str], answered: set[str]) -> list[FieldViolation]:
    return [
        FieldViolation(call_path, f"call {call_id!r} has no TOOL result before the conversation goes on")
        for call_id, call_path in pending.items()
        if call_id not in answered
    ]


def _check_tools(request: chat_pb2.ChatRequest, path: str) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    names: set[str] = set()
    for i, tool in enumerate(request.tools):
        where = f"{path}tools[{i}]"
        if not tool.name:
            out.append(FieldViolation(f"{where}.name", "a tool needs a name"))
        elif not FUNCTION_NAME.fullmatch(tool.name):
            out.append(FieldViolation(f"{where}.name", FUNCTION_NAME_RULE))
        elif tool.name in names:
            out.append(FieldViolation(f"{where}.name", f"tool name {tool.name!r} is used twice"))
        names.add(tool.name)
        if tool.parameters_json_schema:
            out += _check_schema(tool.parameters_json_schema, f"{where}.parameters_json_schema")
    choice = request.tool_choice
    if choice.mode not in Mode.values():
        out.append(FieldViolation(f"{path}tool_choice.mode", "unknown tool choice mode"))
    if choice.mode == Mode.MODE_FUNCTION:
        if not choice.function_name:
            out.append(
                FieldViolation(f"{path}tool_choice.function_name", "MODE_FUNCTION needs a function name")
            )
        elif choice.function_name not in names:
            out.append(
                FieldViolation(
                    f"{path}tool_choice.function_name",
                    f"{choice.function_name!r} is not one of the request's tools",
                )
            )
    elif choice.mode == Mode.MODE_ANY and not request.tools:
        out.append(FieldViolation(f"{path}tool_choice.mode", "MODE_ANY needs at least one tool"))
    elif choice.mode in (Mode.MODE_AUTO, Mode.MODE_NONE, Mode.MODE_UNSPECIFIED) and choice.function_name:
        out.append(FieldViolation(f"{path}tool_choice.function_name", "only MODE_FUNCTION names a function"))
    return out


def _check_response_format(request: chat_pb2.ChatRequest, path: str) -> list[FieldViolation]:
    """The answer's format: a known type, a valid schema with JSON_SCHEMA only, and a tool choice the
    JSON can be enforced with (the grammar allows JSON or calls, never a forced call and JSON)."""
    fmt, where = request.response_format, f"{path}response_format"
    if fmt.type not in Format.Type.values():
        return [FieldViolation(f"{where}.type", "unknown response format type")]
    out: list[FieldViolation] = []
    if fmt.type == Format.TYPE_JSON_SCHEMA:
        schema = fmt.json_schema
        if not schema.name:
            out.append(FieldViolation(f"{where}.json_schema.name", "a JSON schema format needs a name"))
        elif not FUNCTION_NAME.fullmatch(schema.name):
            out.append(
                FieldViolation(f"{where}.json_schema.name", FUNCTION_NAME_RULE.replace("function", "schema"))
            )
        if not schema.schema_json:
            out.append(FieldViolation(f"{where}.json_schema", "TYPE_JSON_SCHEMA needs a schema"))
        else:
            out += _check_schema(schema.schema_json, f"{where}.json_schema")
    elif fmt.HasField("json_schema"):
        out.append(FieldViolation(f"{where}.json_schema", "only TYPE_JSON_SCHEMA takes a schema"))
    json_answer = fmt.type in (Format.TYPE_JSON_OBJECT, Format.TYPE_JSON_SCHEMA)
    if json_answer and request.tools and request.tool_choice.mode in (Mode.MODE_ANY, Mode.MODE_FUNCTION):
        out.append(FieldViolation(f"{where}.type", "a JSON answer with tools needs tool_choice AUTO or NONE"))
    return out


def _check_schema(text: str, where: str) -> list[FieldViolation]:
    problem = _json_object_problem(text)
    if problem:
        return [FieldViolation(where, f"the schema must be a JSON object: {problem}")]
    try:
        validate_json_schema_by_draft7(json.loads(text))
    except ValueError as exc:
        return [FieldViolation(where, f"not a valid JSON Schema (draft 7): {exc}")]
    except RecursionError:
        return [FieldViolation(where, "the schema nests too deep")]
    return []


def _json_object_problem(text: str) -> str | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"not JSON ({exc})"
    return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def _check_sampling(request: chat_pb2.ChatRequest, path: str, limits: Limits) -> list[FieldViolation]:
    """Sampling fields whose values no engine accepts: the table's bounds, then max_tokens and stop."""
    out: list[FieldViolation] = []
    s = request.sampling
    where = f"{path}sampling"
    for parameter, value in sampling.raw_values(s):
        problem = parameter.problem(value)
        if problem:
            out.append(FieldViolation(f"{where}.{parameter.field}", problem))
    if s.HasField("max_tokens"):
        problem = max_tokens_problem(s.max_tokens, limits.context_length)
        if problem:
            out.append(FieldViolation(f"{where}.max_tokens", problem))
    out += _check_sampling_pairs(s, where, limits)
    if len(s.stop) > limits.max_stop_sequences:
        out.append(
            FieldViolation(
                f"{where}.stop",
                f"{len(s.stop)} stop sequences; at most {limits.max_stop_sequences} are accepted",
            )
        )
    for i, stop in enumerate(s.stop):
        if not stop:
            out.append(FieldViolation(f"{where}.stop[{i}]", "a stop sequence cannot be empty"))
        elif len(stop) > limits.max_stop_sequence_chars:
            out.append(
                FieldViolation(
                    f"{where}.stop[{i}]",
                    f"the stop sequence is {len(stop)} characters; at most "
                    f"{limits.max_stop_sequence_chars} are accepted",
                )
            )
    return out


def _check_sampling_pairs(s: chat_pb2.SamplingParams, where: str, limits: Limits) -> list[FieldViolation]:
    """The rules between two sampling fields (each field's own bound is its table row)."""
    out: list[FieldViolation] = []
    if s.HasField("top_logprobs") and not s.logprobs:
        out.append(FieldViolation(f"{where}.top_logprobs", "top_logprobs needs logprobs set to true"))
    if s.HasField("min_tokens"):
        if s.HasField("max_tokens") and s.min_tokens > s.max_tokens:
            out.append(
                FieldViolation(
                    f"{where}.min_tokens", f"min_tokens ({s.min_tokens}) is over max_tokens ({s.max_tokens})"
                )
            )
        elif s.min_tokens > limits.context_length:
            out.append(
                FieldViolation(
                    f"{where}.min_tokens",
                    f"min_tokens is {s.min_tokens}; the context holds {limits.context_length} tokens",
                )
            )
    return out


def _check_client_request_id(
    request: chat_pb2.ChatRequest, path: str, limits: Limits
) -> list[FieldViolation]:
    crid = request.client_request_id
    if not crid:
        return []
    where = f"{path}client_request_id"
    if len(crid) > limits.max_client_request_id_chars:
        return [
            FieldViolation(
                where, f"client_request_id may be at most {limits.max_client_request_id_chars} characters"
            )
        ]
    if not CLIENT_REQUEST_ID.fullmatch(crid):
        return [FieldViolation(where, "client_request_id must be printable ASCII without spaces")]
    return []


def check_budget(
    counted: chat_pb2.CountTokensResponse, request: chat_pb2.ChatRequest, limits: Limits, *, path: str = ""
) -> int:
    """Refuse a request whose prompt leaves no room to answer; else the tokens it may generate: a
    max_tokens over the room left is clamped by the worker, as vLLM does (`contract.new_tokens_allowed`)."""
    s = request.sampling
    try:
        return new_tokens_allowed(
            counted.prompt_tokens, s.max_tokens if s.HasField("max_tokens") else None, limits.context_length
        )
    except BudgetProblem as problem:
        raise InvalidRequest([FieldViolation(f"{path}{problem.field}", problem.description)]) from problem
