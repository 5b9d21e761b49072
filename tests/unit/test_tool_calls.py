"""The streaming tool-call parser on crafted model outputs, and the marks of special tokens by id.

`special(s)` reads the marker names in `s` as the special tokens (what the model writes with them);
text fed without marks is ordinary tokens' text, whatever it spells.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest

from mistral_serve.v1 import chat_pb2 as pb
from mistral_serve.worker.engine import Marker, TokenMark
from mistral_serve.worker.tool_calls import ToolCallStreamParser, new_tool_call_id
from tests.support.scripted_engine import marks as special

ID_RE = re.compile(r"[A-Za-z0-9]{9}")


def run(
    chunks: list[str], *, literal: bool = False, parser: ToolCallStreamParser | None = None
) -> tuple[str, list[pb.FunctionCallDelta], list[pb.FunctionCall]]:
    """Feed `chunks` (their marker names as special tokens, or as ordinary text if `literal`)."""
    parser = parser or ToolCallStreamParser()
    text, deltas = "", []
    for chunk in chunks:
        t, d = parser.feed(chunk, () if literal else special(chunk))
        text += t
        deltas += d
    tail, calls = parser.finish()
    return text + tail, deltas, calls


def every_split(s: str) -> list[list[str]]:
    """`s` cut into two outputs at each token boundary, and into one output per character; a special
    token is one token, never cut."""
    inside = {i for m in special(s) for i in range(m.start + 1, m.end)}
    cuts = [i for i in range(len(s) + 1) if i not in inside]
    singles = [s[a:b] for a, b in itertools.pairwise(cuts)]
    return [[s[:i], s[i:]] for i in cuts] + [singles]


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
    "chunks", every_split('Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "[x} \\"y\\""}')
)
def test_calls_split_anywhere_across_deltas_parse_the_same(chunks: list[str]) -> None:
    text, deltas, calls = run(chunks)
    assert text == "Let me check."
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [("get_weather", {"city": '[x} "y"'})]
    assert rebuilt(deltas)[0][1:] == ("get_weather", calls[0].arguments_json)


@pytest.mark.parametrize(
    "output",
    [
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        'Say [TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{} please',
        "[TOOL_CALLS][ARGS]{}",
    ],
)
def test_marker_names_written_as_ordinary_tokens_stay_text(output: str) -> None:
    for chunks in ([output], list(output)):
        assert run(chunks, literal=True) == (output, [], [])


def test_text_is_shown_as_soon_as_it_arrives() -> None:
    parser = ToolCallStreamParser()
    assert parser.feed("Hi [TOOL_") == ("Hi [TOOL_", [])
    assert parser.feed("CALLS]f") == ("CALLS]f", [])


def test_a_marker_written_as_text_inside_a_call_stays_in_its_arguments() -> None:
    out = '[TOOL_CALLS]f[ARGS]{"q": "'
    parser = ToolCallStreamParser()
    parser.feed(out, special(out))
    parser.feed("[TOOL_CALLS]g[ARGS]")  # ordinary tokens inside the JSON string
    parser.feed('"}')
    assert [(c.name, c.arguments_json) for c in parser.finish()[1]] == [("f", '{"q": "[TOOL_CALLS]g[ARGS]"}')]


def test_the_model_s_call_id_is_read_and_ours_is_given() -> None:
    text, deltas, calls = run(['[TOOL_CALLS]f[CALL_ID]abc123XYZ[ARGS]{"a": 1}'])
    assert text == ""
    assert [(c.name, c.arguments_json) for c in calls] == [("f", '{"a": 1}')]
    assert ID_RE.fullmatch(calls[0].id) and calls[0].id != "abc123XYZ"
    assert rebuilt(deltas) == {0: (calls[0].id, "f", '{"a": 1}')}


def test_marks_may_sit_anywhere_in_an_output() -> None:
    text = 'ok[TOOL_CALLS]f[ARGS]{"a": 1}'
    parser = ToolCallStreamParser()
    # [CALL_ID]'s text is empty: a mark with nothing between start and end.
    marks = [*special(text)[:1], TokenMark(Marker.CALL_ID, 15, 15), *special(text)[1:]]
    shown, _ = parser.feed(text, marks)
    assert shown == "ok"
    assert [c.name for c in parser.finish()[1]] == ["f"]


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
        "[TOOL_CALLS]f[TOOL_CALLS]g",  # a second call before the first's [ARGS]
        '[TOOL_CALLS]f[ARGS]{"a": [ARGS] 1}',  # a marker inside the arguments
        "[ARGS]{}",  # [ARGS] without a call
        "[TOOL_CALLS]f[CALL_ID]x",  # ends before [ARGS]
    ],
)
def test_malformed_output_becomes_text_and_no_call(output: str) -> None:
    for chunks in every_split(output):
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


def test_tool_choice_none_shows_special_tokens_as_text() -> None:
    out = '[TOOL_CALLS]f[ARGS]{"a": 1}'
    assert run([out], parser=ToolCallStreamParser(calls_allowed=False)) == (out, [], [])


def test_resumed_ids_are_those_of_the_first_run() -> None:
    out = '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}'
    first = run([out], parser=ToolCallStreamParser("req-1"))[2]
    cut = out.index("[TOOL_CALLS]g")
    again = ToolCallStreamParser("req-1")
    again.feed(out[:cut], special(out[:cut]))  # what a resumed worker replays
    again.feed(out[cut:], special(out[cut:]))
    assert again.finish()[1] == first


def test_marker_text_in_ordinary_tokens_does_not_open_a_call_for_a_special_args() -> None:
    parser = ToolCallStreamParser()
    shown = parser.feed("[TOOL_CALLS]f")[0]  # ordinary tokens
    shown += parser.feed("[ARGS]{}", special("[ARGS]{}"))[0]  # the special [ARGS], then "{}"
    tail, calls = parser.finish()
    assert (shown + tail, calls) == ("[TOOL_CALLS]f[ARGS]{}", [])
