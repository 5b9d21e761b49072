"""Logprobs and the matched stop sequence, from the real engine, against vLLM's own offline run:
at the engine, and through the whole stack (frontend -> Redis -> worker) on both doors."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from mistral_serve.frontend.server import Frontend
from mistral_serve.v1 import chat_pb2
from mistral_serve.worker.engine import EngineOutput, EngineRequest
from mistral_serve.worker.vllm_engine import VllmEngine, sampling_params
from tests.engine.conversations import text_conversation
from tests.engine.session_engine import session_stack
from tests.engine.vllm_reference import LOGPROBS_RUN, LOGPROBS_SAMPLING
from tests.support import raw_stream
from tests.support.raw_stream import raw_events
from tests.support.waiting import until


async def alone_on(engine: VllmEngine) -> None:
    """Wait until the shared engine runs nothing else: a request an earlier test left running (a
    detached stream in its grace) would share the batch, and batched CPU kernels round differently,
    enough to move a logprob by more than the tolerance."""
    await until(lambda: engine.running_count() == 0, timeout_s=120)


async def run(engine: VllmEngine, request_id: str, chat: chat_pb2.ChatRequest) -> list[EngineOutput]:
    await alone_on(engine)
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


def test_min_tokens_is_clamped_to_max_tokens_and_reduced_by_a_resume() -> None:
    params = chat_pb2.SamplingParams(min_tokens=10)
    assert sampling_params(params, 20).min_tokens == 10
    assert sampling_params(params, 6).min_tokens == 6  # max_tokens was clamped to the room left
    assert sampling_params(params, 20, resumed=4).min_tokens == 6
    assert sampling_params(params, 20, resumed=15).min_tokens == 0
    assert sampling_params(chat_pb2.SamplingParams(), 20).min_tokens == 0


@pytest_asyncio.fixture(loop_scope="session")
async def stack(engine: VllmEngine, redis_url: str) -> AsyncIterator[Frontend]:
    await alone_on(engine)
    async with session_stack(engine, redis_url) as frontend:
        yield frontend


def logprobs_request() -> chat_pb2.ChatRequest:
    return the_text_conversation(
        temperature=LOGPROBS_SAMPLING["temperature"],
        seed=LOGPROBS_SAMPLING["seed"],
        max_tokens=LOGPROBS_SAMPLING["max_tokens"],
        logprobs=True,
        top_logprobs=LOGPROBS_SAMPLING["logprobs"],
    )


def expected_logprobs(reference: dict[str, Any]) -> list[tuple[float, list[float]]]:
    """Per token: its logprob and its alternatives' by rank, from vLLM's offline run."""
    run = reference["greedy"][LOGPROBS_RUN]
    top = LOGPROBS_SAMPLING["logprobs"]
    out = []
    for token_id, position in zip(run["token_ids"], run["logprobs"], strict=True):
        ranked = sorted((rank, lp) for lp, rank in position.values() if rank <= top)
        out.append((position[str(token_id)][0], [lp for _, lp in ranked]))
    return out


def assert_close(got: list[tuple[float, list[float]]], expected: list[tuple[float, list[float]]]) -> None:
    assert len(got) == len(expected)
    for (lp, top), (want_lp, want_top) in zip(got, expected, strict=True):
        assert math.isclose(lp, want_lp, rel_tol=1e-5, abs_tol=1e-5)
        assert len(top) == len(want_top)
        assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5) for a, b in zip(top, want_top, strict=True))


@pytest.mark.asyncio(loop_scope="session")
async def test_grpc_deltas_carry_vllms_logprobs_and_finished_names_the_stop(
    stack: Frontend, vllm_reference: dict[str, Any]
) -> None:
    events = await raw_events(stack.port, raw_stream.start(logprobs_request()), timeout_s=120)
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    got = [(t.logprob, [a.logprob for a in t.top_logprobs]) for d in deltas for t in d.logprobs]
    assert_close(got, expected_logprobs(vllm_reference))
    assert all(len(d.logprobs) == d.token_count for d in deltas)

    greedy = vllm_reference["greedy"]["text"]["text"]
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    chat = the_text_conversation(temperature=0.0, max_tokens=24, stop=[stop])
    events = await raw_events(stack.port, raw_stream.start(chat), timeout_s=120)
    finished = events[-1].finished
    assert (finished.finish_reason, finished.stop) == (chat_pb2.FINISH_REASON_STOP, stop)


def openai_body(chat: chat_pb2.ChatRequest, **extra: Any) -> dict[str, Any]:
    """The text conversation as an OpenAI body, with `chat`'s sampling."""
    s = chat.sampling
    return {
        "messages": text_conversation().openai_messages,
        "temperature": s.temperature,
        "seed": s.seed,
        "max_tokens": s.max_tokens,
        **extra,
    }


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("stream", [False, True])
async def test_openai_door_answers_logprobs_in_openais_shape_and_the_stop_reason(
    stack: Frontend, vllm_reference: dict[str, Any], stream: bool
) -> None:
    top = LOGPROBS_SAMPLING["logprobs"]
    body = openai_body(logprobs_request(), logprobs=True, top_logprobs=top, stream=stream)
    choices = await post(stack, body)
    content = [entry for c in choices if c.get("logprobs") for entry in c["logprobs"]["content"]]
    got = [(e["logprob"], [a["logprob"] for a in e["top_logprobs"]]) for e in content]
    assert_close(got, expected_logprobs(vllm_reference))
    assert all(e["bytes"] == list(e["token"].encode()) for e in content)

    greedy = vllm_reference["greedy"]["text"]["text"]
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    body = openai_body(the_text_conversation(temperature=0.0, max_tokens=24), stop=[stop], stream=stream)
    last = (await post(stack, body))[-1]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop)
    assert last["logprobs"] is None


async def post(stack: Frontend, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The choices of one answer, or of each streamed chunk in order."""
    url = f"http://127.0.0.1:{stack.http_port}/v1/chat/completions"
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        if not body.get("stream"):
            return list((await response.json())["choices"])
        raw = await response.text()
    chunks = [line.removeprefix("data: ") for line in raw.splitlines() if line.startswith("data: ")]
    return [c for chunk in chunks if chunk != "[DONE]" for c in json.loads(chunk)["choices"]]
