"""Tool calls found by token id, on what vLLM's own detokenizer streams for the tiny model's tokenizer.

Each case runs crafted output token ids through vLLM's `IncrementalDetokenizer` (the one `AsyncLLM`'s
output processor uses, one new token per step as the engine yields them), then through the worker's
path: `MarkLocator` with `vllm_engine.detokenize`, then the parser. No engine starts: the point is
the text vLLM writes for these ids, and that is the detokenizer's work alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from vllm import SamplingParams
from vllm.tokenizers.mistral import MistralTokenizer
from vllm.v1.engine import EngineCoreRequest
from vllm.v1.engine.detokenizer import IncrementalDetokenizer

from mistral_serve.worker.tool_call_tokens import MarkLocator, ToolCallTokens
from mistral_serve.worker.tool_calls import ToolCallStreamParser
from mistral_serve.worker.vllm_engine import detokenize
from tests.engine.conftest import TinyModel

CALL_TEXT = '[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}'


@pytest.fixture(scope="module")
def tokenizer(tiny_model: TinyModel) -> MistralTokenizer:
    return MistralTokenizer.from_pretrained(str(tiny_model.path))


def ordinary(tokenizer: MistralTokenizer, text: str) -> list[int]:
    """`text` encoded as normal text: marker names become ordinary tokens."""
    return list(tokenizer.tokenizer.encode(text, bos=False, eos=False))


def special_call(tokenizer: MistralTokenizer, name: str, args: str, call_id: str | None = None) -> list[int]:
    """A call as the model writes it, with the special tokens' own ids."""
    inner = tokenizer.tokenizer
    ids = [inner.get_special_token("[TOOL_CALLS]"), *ordinary(tokenizer, name)]
    if call_id is not None:
        ids += [inner.get_special_token("[CALL_ID]"), *ordinary(tokenizer, call_id)]
    return [*ids, inner.get_special_token("[ARGS]"), *ordinary(tokenizer, args)]


def stream(
    tokenizer: MistralTokenizer, ids: Sequence[int], stop: list[str] | None = None
) -> list[tuple[int, str]]:
    """(token id, delta text) per step, as vLLM's detokenizer streams them; the end token last."""
    params = SamplingParams(max_tokens=len(ids) + 1, stop=stop)
    request = EngineCoreRequest(
        request_id="r",
        prompt_token_ids=[1, 3],
        mm_features=None,
        sampling_params=params,
        pooling_params=None,
        arrival_time=time.time(),
        lora_request=None,
        cache_salt=None,
        data_parallel_rank=None,
    )
    detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, request)
    steps = []
    for i, token_id in enumerate([*ids, tokenizer.eos_token_id]):
        last = i == len(ids)
        detokenizer.update([token_id], stop_terminated=last)  # the end token stops it, unwritten
        steps.append((token_id, detokenizer.get_next_output_text(finished=last, delta=True)))
    return steps


def parse(tokenizer: MistralTokenizer, steps: list[tuple[int, str]]) -> tuple[str, list[tuple[str, str]]]:
    """The worker's path on those steps: (text shown to the caller, calls)."""
    locator = MarkLocator(ToolCallTokens.of(tokenizer.mistral), lambda ids: detokenize(tokenizer, ids))
    parser = ToolCallStreamParser("r")
    shown = ""
    for n, (token_id, text) in enumerate(steps):
        out, marks = locator.add((token_id,), text)
        if n == len(steps) - 1:
            out += locator.flush()
        shown += parser.feed(out, marks)[0]
    tail, calls = parser.finish()
    return shown + tail, [(c.name, c.arguments_json) for c in calls]


def test_marker_names_written_as_ordinary_tokens_stay_text(tokenizer: MistralTokenizer) -> None:
    text = f"Use {CALL_TEXT} to call."
    ids = ordinary(tokenizer, text)
    steps = stream(tokenizer, ids)
    assert "".join(t for _, t in steps) == text  # vLLM writes those tokens' text as it is
    assert parse(tokenizer, steps) == (text, [])


def test_marker_text_in_ordinary_tokens_then_a_special_args_is_no_call(tokenizer: MistralTokenizer) -> None:
    inner = tokenizer.tokenizer
    ids = [*ordinary(tokenizer, "[TOOL_CALLS]get_time"), inner.get_special_token("[ARGS]")]
    ids += ordinary(tokenizer, "{}")
    assert parse(tokenizer, stream(tokenizer, ids)) == ("[TOOL_CALLS]get_time[ARGS]{}", [])


def test_special_token_ids_through_vllm_s_detokenizer_are_a_call(tokenizer: MistralTokenizer) -> None:
    ids = [*ordinary(tokenizer, "Checking."), *special_call(tokenizer, "get_time", '{"zone": "UTC"}')]
    steps = stream(tokenizer, ids)
    assert "".join(t for _, t in steps) == f"Checking.{CALL_TEXT}"  # the same characters as above
    assert parse(tokenizer, steps) == ("Checking.", [("get_time", '{"zone": "UTC"}')])


def test_parallel_calls_with_call_ids_and_a_literal_marker_in_the_arguments(
    tokenizer: MistralTokenizer,
) -> None:
    ids = [
        *special_call(tokenizer, "get_time", '{"zone": "[TOOL_CALLS]"}', call_id="abc123XYZ"),
        *special_call(tokenizer, "get_date", "{}"),
    ]
    assert parse(tokenizer, stream(tokenizer, ids)) == (
        "",
        [("get_time", '{"zone": "[TOOL_CALLS]"}'), ("get_date", "{}")],
    )


def test_text_held_back_for_a_stop_string_keeps_marks_in_place(tokenizer: MistralTokenizer) -> None:
    # vLLM holds back up to len(stop) - 1 characters: the marker's text arrives outputs after its id.
    ids = [*ordinary(tokenizer, f"Say {CALL_TEXT}."), *special_call(tokenizer, "get_time", "{}")]
    steps = stream(tokenizer, ids, stop=["#never-written-stop#"])
    assert any(text == "" for _, text in steps[:-1])  # the lag is real
    assert parse(tokenizer, steps) == (f"Say {CALL_TEXT}.", [("get_time", "{}")])


def test_detokenize_is_what_vllm_streams(tokenizer: MistralTokenizer) -> None:
    """The locator measures a special token's place with `detokenize` of the ids before it and with
    it: that must agree with the stream there (mid-character, between the bytes of one, it cannot)."""
    ids = [*ordinary(tokenizer, "héllo wörld ✓ "), *special_call(tokenizer, "f", "{}", call_id="x1")]
    streamed = "".join(t for _, t in stream(tokenizer, ids))
    assert detokenize(tokenizer, ids) == streamed
    specials = set(ToolCallTokens.of(tokenizer.mistral).ids)
    at = [n for n, token_id in enumerate(ids) if token_id in specials]
    assert len(at) == 3
    for n in at:
        assert streamed.startswith(detokenize(tokenizer, ids[:n]))
        assert streamed.startswith(detokenize(tokenizer, ids[: n + 1]))
