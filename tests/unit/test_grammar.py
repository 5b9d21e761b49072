"""The enforced-output grammar (worker/grammar.py) for the tiny model's tokenizer, and MODE_NONE's parser."""

from __future__ import annotations

import json

import jsonschema
import pytest
from llguidance import LLMatcher, grammar_from

from mistral_serve.common.prompts import PromptBuilder
from mistral_serve.v1 import chat_pb2 as R
from mistral_serve.worker.grammar import GrammarBuilder, GrammarError, any_object, calls_allowed
from mistral_serve.worker.tool_calls import ToolCallStreamParser
from tests.engine.tiny_model import ensure_tiny_model
from tests.integration.front_door_cases import json_format
from tests.support.scripted_engine import marks

Mode = R.ToolChoice.Mode
SCHEMA = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC"]}}}
TOOLS = [R.Tool(name="get_time", parameters_json_schema=json.dumps(SCHEMA)), R.Tool(name="get_date")]


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder.from_model(str(ensure_tiny_model(text_only=True)))


def grammar(
    builder: PromptBuilder, compact: bool = True, enforce_auto: bool = True, **fields: object
) -> str | None:
    chat = R.ChatRequest(messages=[R.Message(role=R.ROLE_USER, content=[R.ContentPart(text="hi")])], **fields)  # type: ignore[arg-type]
    built = builder.build(chat)
    assert built.request is not None
    grammars = GrammarBuilder(builder.tokenizer, compact_json=compact, enforce_auto_tool_calls=enforce_auto)
    return grammars.grammar(chat, built.request)


def fcalls(g: str) -> str:
    return next(line for line in g.splitlines() if line.startswith("fcalls:"))


def test_plain_text_without_tools_needs_no_grammar(builder: PromptBuilder) -> None:
    assert grammar(builder) is None


def test_auto_with_tools_is_enforced_unless_switched_off_and_forced_choices_always_are(
    builder: PromptBuilder,
) -> None:
    auto = R.ToolChoice(mode=Mode.MODE_AUTO)
    assert grammar(builder, tools=TOOLS) is not None
    assert grammar(builder, tools=TOOLS, tool_choice=auto) is not None
    assert grammar(builder, enforce_auto=False, tools=TOOLS) is None
    assert grammar(builder, enforce_auto=False, tools=TOOLS, tool_choice=auto) is None
    # Off only frees auto mode: a forced call, text-only and a JSON answer stay enforced.
    for forced in (
        {"tool_choice": R.ToolChoice(mode=Mode.MODE_ANY)},
        {"tool_choice": R.ToolChoice(mode=Mode.MODE_NONE)},
        {"response_format": R.ResponseFormat(type=R.ResponseFormat.TYPE_JSON_OBJECT)},
    ):
        assert grammar(builder, enforce_auto=False, tools=TOOLS, **forced) is not None, forced


def test_any_pins_the_request_s_tools_and_their_schemas(builder: PromptBuilder) -> None:
    g = grammar(builder, tools=TOOLS, tool_choice=R.ToolChoice(mode=Mode.MODE_ANY))
    assert g is not None
    assert "body: fcalls" in g and '"get_time"' in g and '"get_date"' in g
    assert "/.+/" not in g, "a non-strict tool would let any name through"
    assert '"enum": ["UTC"]' in g and '"whitespace_flexible": false' in g
    assert fcalls(g).endswith(")+"), "parallel calls by default"


def test_one_call_only_without_parallel_calls(builder: PromptBuilder) -> None:
    g = grammar(builder, tools=TOOLS, tool_choice=R.ToolChoice(mode=Mode.MODE_ANY), parallel_tool_calls=False)
    assert g is not None and not fcalls(g).endswith(")+")


def test_function_choice_keeps_only_that_tool(builder: PromptBuilder) -> None:
    g = grammar(
        builder, tools=TOOLS, tool_choice=R.ToolChoice(mode=Mode.MODE_FUNCTION, function_name="get_date")
    )
    assert g is not None and '"get_date"' in g and '"get_time"' not in g


def test_none_allows_text_only(builder: PromptBuilder) -> None:
    g = grammar(builder, tools=TOOLS, tool_choice=R.ToolChoice(mode=Mode.MODE_NONE))
    assert g is not None and "body: content" in g and "<[9]>" not in g


def test_json_schema_and_object(builder: PromptBuilder) -> None:
    g = grammar(builder, response_format=json_format(json.dumps(SCHEMA)))
    assert g is not None and '"enum": ["UTC"]' in g
    g = grammar(
        builder, compact=False, response_format=R.ResponseFormat(type=R.ResponseFormat.TYPE_JSON_OBJECT)
    )
    assert g is not None and '%json {"type": "object"}' in g


def test_json_with_a_forced_call_is_refused(builder: PromptBuilder) -> None:
    with pytest.raises(GrammarError):
        grammar(
            builder,
            tools=TOOLS,
            tool_choice=R.ToolChoice(mode=Mode.MODE_ANY),
            response_format=R.ResponseFormat(type=R.ResponseFormat.TYPE_JSON_OBJECT),
        )


def test_none_returns_what_the_model_writes_as_text() -> None:
    chat = R.ChatRequest(tool_choice=R.ToolChoice(mode=Mode.MODE_NONE))
    parser = ToolCallStreamParser("r", calls_allowed=calls_allowed(chat))
    output = '[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}'
    text, deltas = parser.feed(output, marks(output))  # the special tokens, found by id
    tail, calls = parser.finish()
    assert text + tail == '[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}' and not deltas and not calls


def test_a_replay_drops_the_streamed_tokens_and_catches_a_divergence() -> None:
    from mistral_serve.worker.vllm_engine import ReplayDiverged, _Replay

    replay = _Replay((1, 2, 3))
    assert replay.past((1, 2)) == () and not replay.done
    assert replay.past((3, 4, 5)) == (4, 5) and replay.done
    with pytest.raises(ReplayDiverged):
        _Replay((1, 2)).past((1, 9))


@pytest.mark.parametrize(("max_string", "max_depth"), [(16, 1), (4, 2), (None, 2), (8, None)])
def test_bounded_json_objects_are_valid_llguidance_schemas(
    max_string: int | None, max_depth: int | None
) -> None:
    schema = any_object(max_string, max_depth)
    assert LLMatcher.validate_grammar_with_warnings(grammar_from("json_schema", json.dumps(schema))) == (
        False,
        [],
    )


def test_a_bounded_json_object_bounds_its_strings_keys_and_depth() -> None:
    flat = any_object(4, 1)
    jsonschema.validate({"abcd": "wxyz", "n": 1.5, "b": True, "z": None}, flat)
    too_much_cases: list[dict[str, object]] = [{"abcde": 1}, {"a": "vwxyz"}, {"a": {}}, {"a": [1]}]
    for too_much in too_much_cases:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(too_much, flat)
    jsonschema.validate({"a": [{"b": "c"}]}, any_object(4, 3))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": [{"b": [1]}]}, any_object(4, 3))
    deep = any_object(2, None)  # any depth, short strings
    jsonschema.validate({"a": {"b": {"c": ["de"]}}}, deep)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": {"b": {"c": ["def"]}}}, deep)
    assert any_object() == {"type": "object"}


def test_the_json_object_answer_uses_the_bounded_schema(builder: PromptBuilder) -> None:
    chat = R.ChatRequest(
        messages=[R.Message(role=R.ROLE_USER, content=[R.ContentPart(text="hi")])],
        response_format=R.ResponseFormat(type=R.ResponseFormat.TYPE_JSON_OBJECT),
    )
    built = builder.build(chat)
    assert built.request is not None
    bounded = GrammarBuilder(builder.tokenizer, json_max_string=5, json_max_depth=1).grammar(
        chat, built.request
    )
    free = GrammarBuilder(builder.tokenizer).grammar(chat, built.request)
    assert bounded is not None and free is not None
    assert '"maxLength": 5' in bounded and "maxLength" not in free
