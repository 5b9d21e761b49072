"""Structural checks of a ChatRequest, and the defaults applied before it is queued.

Every check names the offending field by its path, so a caller can fix it without guessing.
"""

from __future__ import annotations

from mistral_serve.v1 import chat_pb2

from .errors import FieldViolation, InvalidRequest

DEFAULT_TEMPERATURE = 0.15  # The model card's recommendation.

Role = chat_pb2.Role


def validate_chat_request(request: chat_pb2.ChatRequest, *, path: str = "") -> None:
    """Raise InvalidRequest listing every structural problem of `request`."""
    violations: list[FieldViolation] = []
    violations += _check_messages(request, path)
    violations += _check_tools(request, path)
    violations += _check_sampling(request, path)
    if violations:
        raise InvalidRequest(violations)


def apply_defaults(request: chat_pb2.ChatRequest) -> chat_pb2.ChatRequest:
    """A copy of `request` with the service's defaults filled in."""
    filled = chat_pb2.ChatRequest()
    filled.CopyFrom(request)
    if not filled.sampling.HasField("temperature"):
        filled.sampling.temperature = DEFAULT_TEMPERATURE
    return filled


def _check_messages(request: chat_pb2.ChatRequest, path: str) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    messages = request.messages
    if not messages:
        return [FieldViolation(f"{path}messages", "at least one message is required")]
    for i, message in enumerate(messages):
        where = f"{path}messages[{i}]"
        out += _check_message(message, where, is_last=i == len(messages) - 1)
    last = messages[-1]
    if last.role == Role.ROLE_ASSISTANT and not last.prefix:
        out.append(
            FieldViolation(
                f"{path}messages[{len(messages) - 1}].role",
                "the last message must be USER or TOOL, or ASSISTANT with prefix=true to continue it",
            )
        )
    if last.role == Role.ROLE_SYSTEM:
        out.append(
            FieldViolation(f"{path}messages[{len(messages) - 1}].role", "the last message cannot be SYSTEM")
        )
    return out


def _check_message(message: chat_pb2.Message, where: str, *, is_last: bool) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if message.role == Role.ROLE_UNSPECIFIED or message.role not in Role.values():
        return [FieldViolation(f"{where}.role", "role must be SYSTEM, USER, ASSISTANT or TOOL")]
    for j, part in enumerate(message.content):
        out += _check_part(part, f"{where}.content[{j}]", message.role)
    if message.role == Role.ROLE_ASSISTANT:
        if not message.content and not message.tool_calls:
            out.append(FieldViolation(f"{where}.content", "an assistant message needs content or tool_calls"))
        for k, call in enumerate(message.tool_calls):
            if not call.id:
                out.append(FieldViolation(f"{where}.tool_calls[{k}].id", "a tool call needs an id"))
            if not call.name:
                out.append(FieldViolation(f"{where}.tool_calls[{k}].name", "a tool call needs a name"))
    elif not message.content:
        out.append(FieldViolation(f"{where}.content", "content is required"))
    if message.role != Role.ROLE_ASSISTANT and message.tool_calls:
        out.append(FieldViolation(f"{where}.tool_calls", "only ASSISTANT messages carry tool_calls"))
    if message.role == Role.ROLE_TOOL and not message.tool_call_id:
        out.append(FieldViolation(f"{where}.tool_call_id", "a TOOL message must name the call it answers"))
    if message.role != Role.ROLE_TOOL and message.tool_call_id:
        out.append(FieldViolation(f"{where}.tool_call_id", "only TOOL messages carry tool_call_id"))
    if message.prefix and not (message.role == Role.ROLE_ASSISTANT and is_last):
        out.append(FieldViolation(f"{where}.prefix", "prefix is only allowed on the last, ASSISTANT message"))
    return out


def _check_part(part: chat_pb2.ContentPart, where: str, role: int) -> list[FieldViolation]:
    kind = part.WhichOneof("kind")
    if kind is None:
        return [FieldViolation(where, "a content part must set text, image or image_url")]
    if kind == "text":
        return []
    if role != Role.ROLE_USER:
        return [FieldViolation(f"{where}.{kind}", "images are only allowed in USER messages")]
    if kind == "image":
        out = []
        if not part.image.data:
            out.append(FieldViolation(f"{where}.image.data", "image data is empty"))
        if not part.image.mime_type:
            out.append(FieldViolation(f"{where}.image.mime_type", "the image's MIME type is required"))
        return out
    if not part.image_url:
        return [FieldViolation(f"{where}.image_url", "image_url is empty")]
    return []


def _check_tools(request: chat_pb2.ChatRequest, path: str) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    names: set[str] = set()
    for i, tool in enumerate(request.tools):
        if not tool.name:
            out.append(FieldViolation(f"{path}tools[{i}].name", "a tool needs a name"))
        elif tool.name in names:
            out.append(FieldViolation(f"{path}tools[{i}].name", f"tool name {tool.name!r} is used twice"))
        names.add(tool.name)
    choice = request.tool_choice
    Mode = chat_pb2.ToolChoice.Mode
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


def _check_sampling(request: chat_pb2.ChatRequest, path: str) -> list[FieldViolation]:
    """Sampling fields whose values no engine accepts."""
    out: list[FieldViolation] = []
    s = request.sampling
    if s.HasField("max_tokens") and s.max_tokens < 1:
        out.append(FieldViolation(f"{path}sampling.max_tokens", "max_tokens must be at least 1"))
    if s.HasField("temperature") and not 0.0 <= s.temperature <= 2.0:
        out.append(FieldViolation(f"{path}sampling.temperature", "temperature must be within [0, 2]"))
    if s.HasField("top_p") and not 0.0 < s.top_p <= 1.0:
        out.append(FieldViolation(f"{path}sampling.top_p", "top_p must be within (0, 1]"))
    return out
