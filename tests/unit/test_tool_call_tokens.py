"""Special tokens found by id and marked in streamed text (`tool_call_tokens.py`), fed to the parser.

A made-up vocabulary stands in for the detokenizer here; tests/engine/test_tool_call_tokens.py runs
the same path on vLLM's own detokenizer and the tiny model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from mistral_serve.common.prompts import PromptBuilder
from mistral_serve.worker.engine import Marker, TokenMark
from mistral_serve.worker.tool_call_tokens import MarkLocator, ToolCallTokens, locate
from mistral_serve.worker.tool_calls import ToolCallStreamParser
from tests.engine.tiny_model import ensure_tiny_model

TOKENS = ToolCallTokens({9: Marker.TOOL_CALLS, 32: Marker.ARGS, 33: Marker.CALL_ID})
VOCAB = {
    9: "[TOOL_CALLS]",  # special
    32: "[ARGS]",  # special
    33: "",  # [CALL_ID]: the detokenizer writes nothing for it
    1: "Hi",
    2: " [",
    3: "TOOL",
    4: "_CALLS]",
    5: "get",
    6: "_time",
    7: '{"zone": "',
    8: 'UTC"}',
    10: "abc123XYZ",
}
# "Hi [TOOL_CALLS]" in ordinary tokens, then a call in special ones.
OUTPUT = (1, 2, 3, 4, 9, 5, 6, 33, 10, 32, 7, 8)


def detokenize(ids: Sequence[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def parse(steps: Sequence[tuple[tuple[int, ...], str]], finish_text: str = "") -> tuple[str, list[str]]:
    """Run outputs (new ids, new text) through a locator and the parser: (text shown, calls)."""
    locator = MarkLocator(TOKENS, detokenize)
    parser = ToolCallStreamParser()
    shown = ""
    # The last output brings the text held back for stop strings, with no new id.
    for ids, text in [*steps, ((), finish_text)]:
        out, marks = locator.add(ids, text)
        shown += parser.feed(out, marks)[0]
    shown += parser.feed(locator.flush())[0]
    tail, calls = parser.finish()
    return shown + tail, [f"{c.name}{c.arguments_json}" for c in calls]


def test_ordinary_tokens_that_spell_a_marker_stay_text_and_special_ones_make_a_call() -> None:
    one_by_one = [((i,), VOCAB[i]) for i in OUTPUT]
    assert parse(one_by_one) == ("Hi [TOOL_CALLS]", ['get_time{"zone": "UTC"}'])
    assert parse([(OUTPUT, detokenize(OUTPUT))]) == ("Hi [TOOL_CALLS]", ['get_time{"zone": "UTC"}'])


def test_only_ordinary_tokens_give_the_text_unchanged() -> None:
    ids = (1, 2, 3, 4, 5, 7, 8)
    assert parse([((i,), VOCAB[i]) for i in ids]) == (detokenize(ids), [])


def test_text_that_lags_the_ids_still_puts_each_mark_in_its_place() -> None:
    # vLLM holds back the last characters that could begin a stop string: here 7 of them.
    steps, released = [], 0
    for n in range(1, len(OUTPUT) + 1):
        whole = detokenize(OUTPUT[:n])
        upto = max(released, len(whole) - 7)
        steps.append(((OUTPUT[n - 1],), whole[released:upto]))
        released = upto
    assert parse(steps, finish_text=detokenize(OUTPUT)[released:]) == (
        "Hi [TOOL_CALLS]",
        ['get_time{"zone": "UTC"}'],
    )


def test_a_special_token_s_text_cut_by_the_lag_is_held_to_the_next_output() -> None:
    locator = MarkLocator(TOKENS, detokenize)
    assert locator.add((1, 9), "Hi[TOOL") == ("Hi", ())
    assert locator.add((5,), "_CALLS]get") == ("[TOOL_CALLS]get", (TokenMark(Marker.TOOL_CALLS, 0, 12),))


def test_a_resumed_run_is_located_from_its_ids_alone() -> None:
    text, marks = locate(TOKENS, detokenize, OUTPUT[:10])
    assert text == "Hi [TOOL_CALLS][TOOL_CALLS]get_timeabc123XYZ[ARGS]"
    assert [(m.marker, text[m.start : m.end]) for m in marks] == [
        (Marker.TOOL_CALLS, "[TOOL_CALLS]"),
        (Marker.CALL_ID, ""),
        (Marker.ARGS, "[ARGS]"),
    ]
    assert marks[0].start == len("Hi [TOOL_CALLS]")


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder.from_model(str(ensure_tiny_model(text_only=True)))


def test_the_ids_are_found_by_name_in_the_model_s_tokenizer(builder: PromptBuilder) -> None:
    tokens = ToolCallTokens.of(builder.tokenizer)
    inner = builder.tokenizer.instruct_tokenizer.tokenizer
    assert sorted(tokens.ids.values(), key=lambda m: m.value) == sorted(Marker, key=lambda m: m.value)
    for token_id, marker in tokens.ids.items():
        assert inner.id_to_piece(token_id) == marker.value
    # The same characters as ordinary text are other tokens.
    assert not set(inner.encode("[TOOL_CALLS]x[ARGS]", bos=False, eos=False)) & set(tokens.ids)


def test_a_decode_shorter_than_the_stream_never_puts_a_mark_before_sent_text() -> None:
    # The stream wrote "Hi" for token 1 where the decode of it alone gives nothing (a character cut).
    locator = MarkLocator(TOKENS, lambda ids: "".join("" if i == 1 else VOCAB[i] for i in ids))
    assert locator.add((1,), "Hi") == ("Hi", ())
    assert locator.add((9,), "[TOOL_CALLS]") == ("[TOOL_CALLS]", (TokenMark(Marker.TOOL_CALLS, 0, 12),))
