"""The grammar that enforces a request's tool choice and response format while it is generated.

Built the way vLLM's Mistral path builds it (`vllm/parser/mistral.py`): mistral_common's
`GrammarFactory` renders a Lark grammar from the tools, the tool choice and the response format, with
`[TOOL_CALLS]` and `[ARGS]` as special-token terminals, and vLLM's structured outputs run it (Lark
grammars for Tekken tokenizers go to its llguidance backend). vLLM 0.32's own call into the factory
lacks `force_tool_names` for mistral_common 1.13, so we call `get_grammar_for_chat_request`, the
factory's one-pass entry point, ourselves.

Two choices differ from a plain `GrammarFactory` call, both so that a forced call is the call the
caller asked for:
- every tool is rendered `strict`: its name is pinned and its arguments follow its schema (a
  non-strict tool would let the model write any name and any object);
- with `compact_json`, JSON is generated without whitespace between its tokens (llguidance's
  `whitespace_flexible: false`): a model never pads a value with runs of spaces and newlines, and the
  answer is the shortest text of the same JSON.

With `json_max_string` and `json_max_depth`, "any JSON object" (response format JSON object, or a
non-strict schema) is any JSON object whose keys and strings are at most that many characters and
whose arrays and objects nest at most that deep: a model that keeps a free string open or keeps
opening values (as a weak or random one does) is made to close them.
"""

from __future__ import annotations

import json
from typing import Any

from mistral_common.exceptions import InvalidRequestException
from mistral_common.guidance.grammar_factory import GrammarFactory
from mistral_common.protocol.instruct.request import (
    ChatCompletionRequest,
    JsonSchema,
    ResponseFormat,
    ResponseFormats,
)
from mistral_common.protocol.instruct.tool_calls import Tool

from mistral_serve.common.prompts import Tokenizer
from mistral_serve.v1 import chat_pb2

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# A tool that declares no parameters takes an empty object, as mistral_common renders it.
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
# llguidance's JSON options, read from a schema's root (`x-guidance`).
_COMPACT = {"x-guidance": {"whitespace_flexible": False}}
Format = chat_pb2.ResponseFormat


class GrammarError(ValueError):
    """The request's tools, tool choice and response format cannot be enforced together."""


class GrammarBuilder:
    """Lark grammars for one tokenizer; None where a request needs no constraint."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        compact_json: bool = True,
        json_max_string: int | None = None,
        json_max_depth: int | None = None,
        enforce_auto_tool_calls: bool = True,
    ) -> None:
        # Tekken v11+ only (the tokenizers with [ARGS]); older ones get no grammar, as in vLLM.
        self._factory = GrammarFactory(tokenizer) if GrammarFactory.is_supported(tokenizer) else None
        self._template = self._factory.select_jinja_template() if self._factory is not None else ""
        self._compact_json = compact_json
        self._any_object = any_object(json_max_string, json_max_depth)
        self._enforce_auto = enforce_auto_tool_calls

    @property
    def supported(self) -> bool:
        return self._factory is not None

    def grammar(self, chat: chat_pb2.ChatRequest, request: ChatCompletionRequest[Any]) -> str | None:
        """The grammar for `chat`, whose mistral_common form (prompt builder's) is `request`."""
        if self._factory is None or (not self._enforce_auto and _free_text_or_calls(chat)):
            return None
        constrained = request.model_copy(
            update={
                "tools": [self._strict(tool) for tool in request.tools] if request.tools else None,
                "response_format": self._response_format(chat.response_format),
                "parallel_tool_calls": parallel_tool_calls(chat),
            }
        )
        try:
            return self._factory.get_grammar_for_chat_request(constrained, self._template)
        except (InvalidRequestException, ValueError) as exc:
            raise GrammarError(str(exc)) from exc

    def _schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {**schema, **_COMPACT} if self._compact_json else schema

    def _strict(self, tool: Tool) -> Tool:
        parameters = self._schema(tool.function.parameters or _NO_PARAMETERS)
        function = tool.function.model_copy(update={"strict": True, "parameters": parameters})
        return tool.model_copy(update={"function": function})

    def _response_format(self, fmt: chat_pb2.ResponseFormat) -> ResponseFormat:
        if fmt.type in (Format.TYPE_UNSPECIFIED, Format.TYPE_TEXT):
            return ResponseFormat(type=ResponseFormats.text)
        schema = self._any_object
        if fmt.type == Format.TYPE_JSON_SCHEMA and fmt.json_schema.strict:
            schema = json.loads(fmt.json_schema.schema_json)
        # Always a strict schema for the factory: a non-strict one is any JSON object here, and
        # passing it as a schema of our own lets it be compact too.
        named = JsonSchema(name=fmt.json_schema.name or "answer", schema=self._schema(schema), strict=True)
        return ResponseFormat(type=ResponseFormats.json_schema, json_schema=named)


def any_object(max_string: int | None = None, max_depth: int | None = None) -> dict[str, Any]:
    """The schema of "any JSON object", with keys and strings of at most `max_string` characters and
    arrays and objects nested at most `max_depth` deep (the answer itself is depth 1); None: no bound.
    llguidance has no `propertyNames`, so a key pattern bounds the keys."""
    if max_string is None and max_depth is None:
        return _ANY_OBJECT
    string: dict[str, Any] = {"type": "string"}
    if max_string is not None:
        string["maxLength"] = max_string
    scalar = [string, {"type": ["number", "boolean", "null"]}]

    def containers(value: dict[str, Any]) -> list[dict[str, Any]]:
        members: dict[str, Any] = (
            {"additionalProperties": value}
            if max_string is None
            else {"patternProperties": {f"^.{{0,{max_string}}}$": value}, "additionalProperties": False}
        )
        return [{"type": "array", "items": value}, {"type": "object", **members}]

    if max_depth is None:
        ref = {"$ref": "#/$defs/value"}
        return {"$defs": {"value": {"anyOf": [*scalar, *containers(ref)]}}, **containers(ref)[1]}
    value: dict[str, Any] = {"anyOf": scalar}
    for _ in range(max_depth - 1):  # from the innermost level out
        value = {"anyOf": [*scalar, *containers(value)]}
    return containers(value)[1]


def _free_text_or_calls(chat: chat_pb2.ChatRequest) -> bool:
    """Tool choice auto with a text answer: the model may write text or calls, nothing is forced."""
    auto = chat.tool_choice.mode in (chat_pb2.ToolChoice.MODE_UNSPECIFIED, chat_pb2.ToolChoice.MODE_AUTO)
    text = chat.response_format.type in (Format.TYPE_UNSPECIFIED, Format.TYPE_TEXT)
    return auto and text


def parallel_tool_calls(chat: chat_pb2.ChatRequest) -> bool:
    """Whether the model may make several calls (unset: yes, as in OpenAI's API and vLLM)."""
    return chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else True


def calls_allowed(chat: chat_pb2.ChatRequest) -> bool:
    """MODE_NONE: whatever the model writes is text, never a call."""
    return chat.tool_choice.mode != chat_pb2.ToolChoice.MODE_NONE
