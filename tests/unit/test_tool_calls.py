"""The streaming tool-call parser on crafted model outputs."""

from __future__ import annotations

import json
import re

import pytest

from mistral_serve.v1 import chat_pb2 as pb
from mistral_serve.worker.tool_calls import ToolCallStreamParser, new_tool_call_id

ID_RE = re.compile(r"[A-Za-z0-9]{9}")


def run(chunks: list[str]) -> tuple[str, list[pb.FunctionCallDelta], list[pb.FunctionCall]]:
    parser = ToolCallStreamParser()
    text, deltas = "", []
    for chunk in chunks:
        t, d = parser.feed(chunk)
        text += t
        deltas += d
    tail, calls = parser.finish()
    return text + tail, deltas, calls


def every_split(s: str) -> list[list[str]]:
    """`s` cut into two pieces at each position, and into single characters."""
    return [[s[:i], s[i:]] for i in range(len(s) + 1)] + [list(s)]


def rebuilt(deltas: list[pb.FunctionCallDelta]) -> dict[int, tuple[str, str, str]]:
    """Per call index: (id, name, arguments) as a client would assemble them from the deltas."""
    out: dict[int, tuple[str, str, str]] = {}
    for d in deltas:
        call_id, name, args = out.get(d.index, ("", "", ""))
        out[d.index] = (call_id + d.id, name + d.name, args + d.arguments_fragment)
    return out


def test_plain_text_passes_through_unchanged() -> None:
    assert run(["Hello", " world", " [not a call]"]) == ("Hello world [not a call]", [], [])


def test_single_call_is_parsed_into_a_typed_call() -> None:
    text, deltas, calls = run(['[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'])
    assert text == ""
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert ID_RE.fullmatch(calls[0].id)
    assert rebuilt(deltas) == {0: (calls[0].id, "get_weather", '{"city": "Paris"}')}


def test_name_and_id_come_before_any_argument_fragment() -> None:
    _, deltas, _ = run(["[TOOL_CALLS]f[ARGS]", '{"a"', ": 1}"])
    assert (deltas[0].name, deltas[0].arguments_fragment) == ("f", "")
    assert ID_RE.fullmatch(deltas[0].id)
    assert [d.arguments_fragment for d in deltas[1:]] == ['{"a"', ": 1}"]
    assert all(d.id == "" and d.name == "" for d in deltas[1:])


def test_parallel_calls_get_their_own_index_and_id() -> None:
    out = '[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]{"y": [1, {"z": "}"}]}'
    _, deltas, calls = run([out])
    assert [(c.name, c.arguments_json) for c in calls] == [("a", '{"x": 1}'), ("b", '{"y": [1, {"z": "}"}]}')]
    assert len({c.id for c in calls}) == 2
    assert rebuilt(deltas) == {i: (c.id, c.name, c.arguments_json) for i, c in enumerate(calls)}


@pytest.mark.parametrize(
    "chunks", every_split('Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "[TOOL_CALLS] \\"x\\""}')
)
def test_calls_split_anywhere_across_deltas_parse_the_same(chunks: list[str]) -> None:
    text, deltas, calls = run(chunks)
    assert text == "Let me check."
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("get_weather", {"city": '[TOOL_CALLS] "x"'})
    ]
    assert rebuilt(deltas)[0][1:] == ("get_weather", calls[0].arguments_json)


def test_marker_split_across_deltas_is_not_shown_as_text() -> None:
    parser = ToolCallStreamParser()
    assert parser.feed("Hi [TOOL_") == ("Hi ", [])
    text, deltas = parser.feed("CALLS]f[ARGS]{}")
    assert text == ""
    assert [d.name for d in deltas if d.name] == ["f"]


def test_text_that_only_looks_like_a_marker_start_is_released() -> None:
    parser = ToolCallStreamParser()
    assert parser.feed("a [TOOL") == ("a ", [])
    assert parser.feed("S are great") == ("[TOOLS are great", [])
    assert parser.finish() == ("", [])


def test_legacy_json_list_form_is_understood() -> None:
    text, deltas, calls = run(
        ['[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": "{}"}]']
    )
    assert text == ""
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert sorted(rebuilt(deltas)) == [0, 1]


@pytest.mark.parametrize(
    "output",
    [
        "[TOOL_CALLS]not a name[ARGS]{}",  # spaces in the name
        "[TOOL_CALLS][ARGS]{}",  # no name
        "[TOOL_CALLS]f[ARGS]not json",  # arguments not an object
        '[TOOL_CALLS]f[ARGS]{"a": 1',  # cut off (e.g. at max_tokens)
        '[TOOL_CALLS]f[ARGS]{"a": }',  # closed but invalid JSON
        "[TOOL_CALLS]f",  # ends before [ARGS]
        "[TOOL_CALLS]",  # ends right after the marker
        '[TOOL_CALLS][{"name": 3}]',  # legacy form, bad entry
        "[TOOL_CALLS][1, 2",  # legacy form, cut off
    ],
)
def test_malformed_output_becomes_text_and_no_call(output: str) -> None:
    for chunks in ([output], list(output)):
        text, _, calls = run(chunks)
        assert calls == []
        assert text == output


def test_a_malformed_call_beside_a_good_one_keeps_the_good_one() -> None:
    text, _, calls = run(['[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]oops'])
    assert [c.name for c in calls] == ["f"]
    assert text == "[TOOL_CALLS]g[ARGS]oops"


def test_text_after_the_calls_is_kept_as_text() -> None:
    text, _, calls = run(["[TOOL_CALLS]f[ARGS]{}  and then some words"])
    assert [c.name for c in calls] == ["f"]
    assert text == "  and then some words"


def test_generated_ids_are_nine_alphanumerics_and_distinct() -> None:
    ids = {new_tool_call_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(ID_RE.fullmatch(i) for i in ids)
