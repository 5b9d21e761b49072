"""Logprobs and the matched stop sequence, from the real engine, against vLLM's own offline run."""

from __future__ import annotations

import math
from typing import Any

import pytest

from mistral_serve.v1 import chat_pb2
from mistral_serve.worker.engine import EngineOutput, EngineRequest
from mistral_serve.worker.vllm_engine import VllmEngine
from tests.engine.conversations import text_conversation
from tests.engine.vllm_reference import LOGPROBS_RUN, LOGPROBS_SAMPLING


async def run(engine: VllmEngine, request_id: str, chat: chat_pb2.ChatRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(EngineRequest(request_id, chat))]


def the_text_conversation(**sampling: Any) -> chat_pb2.ChatRequest:
    chat = text_conversation().chat
    chat.default_system_prompt = False
    chat.sampling.CopyFrom(chat_pb2.SamplingParams(**sampling))
    return chat


@pytest.mark.asyncio(loop_scope="session")
async def test_logprobs_equal_vllm_offline_generate_for_the_same_prompt_and_seed(
    engine: VllmEngine, vllm_reference: dict[str, Any]
) -> None:
    expected = vllm_reference["greedy"][LOGPROBS_RUN]
    top = LOGPROBS_SAMPLING["logprobs"]
    chat = the_text_conversation(
        temperature=LOGPROBS_SAMPLING["temperature"],
        seed=LOGPROBS_SAMPLING["seed"],
        max_tokens=LOGPROBS_SAMPLING["max_tokens"],
        logprobs=True,
        top_logprobs=top,
    )
    outputs = await run(engine, "logprobs", chat)
    tokens = [t for out in outputs for t in out.token_ids]
    logprobs = [lp for out in outputs for lp in out.logprobs]
    assert tokens == expected["token_ids"]
    assert [lp.token_id for lp in logprobs] == tokens
    for got, position, token_id in zip(logprobs, expected["logprobs"], tokens, strict=True):
        sampled, _ = position[str(token_id)]
        assert math.isclose(got.logprob, sampled, rel_tol=1e-5, abs_tol=1e-5)
        ranked = sorted((rank, int(tid), lp) for tid, (lp, rank) in position.items() if rank <= top)
        assert [a.token_id for a in got.top_logprobs] == [tid for _, tid, _ in ranked]
        for alternative, (_, _, lp) in zip(got.top_logprobs, ranked, strict=True):
            assert math.isclose(alternative.logprob, lp, rel_tol=1e-5, abs_tol=1e-5)
        assert len(got.top_logprobs) == top
        assert got.token  # decoded by vLLM's detokenizer


@pytest.mark.asyncio(loop_scope="session")
async def test_no_logprobs_unless_asked(engine: VllmEngine) -> None:
    outputs = await run(engine, "no-logprobs", the_text_conversation(temperature=0.0, max_tokens=4))
    assert all(not out.logprobs for out in outputs)


@pytest.mark.asyncio(loop_scope="session")
async def test_the_stop_sequence_that_matched_is_named(
    engine: VllmEngine, vllm_reference: dict[str, Any]
) -> None:
    greedy = vllm_reference["greedy"]["text"]["text"]
    assert len(greedy) >= 4, greedy
    middle = len(greedy) // 2
    stop = greedy[middle : middle + 2]
    chat = the_text_conversation(temperature=0.0, max_tokens=24, stop=["never-in-this-output", stop])
    outputs = await run(engine, "stop", chat)
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].stop == stop
    assert "".join(out.text for out in outputs) == greedy[: greedy.index(stop)]


@pytest.mark.asyncio(loop_scope="session")
async def test_no_stop_is_named_when_the_output_ran_out(engine: VllmEngine) -> None:
    outputs = await run(engine, "length", the_text_conversation(temperature=0.0, max_tokens=3, stop=["zzzz"]))
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].stop is None
