"""`VllmEngine` on the real vLLM CPU path with the tiny model."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from mistral_serve.v1 import chat_pb2 as pb
from mistral_serve.worker.app import start_worker
from mistral_serve.worker.engine import EngineOutput, EngineRequest, EngineRequestError
from mistral_serve.worker.health import DEEP_SERVICE
from mistral_serve.worker.settings import WorkerSettings
from mistral_serve.worker.vllm_engine import VllmEngine, warm_grammar_tokenizer
from tests.engine.conftest import TinyModel
from tests.engine.conversations import data_url, make_png, text
from tests.engine.session_engine import SessionEngine
from tests.engine.tiny_model import VISION_MISSING
from tests.integration.test_front_door import form_of
from tests.support.health import wait_serving
from tests.support.waiting import until

pytestmark = pytest.mark.asyncio(loop_scope="session")


def chat(prompt: str, max_tokens: int, *, temperature: float = 0.0) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content=[text(prompt)])],
        sampling=pb.SamplingParams(temperature=temperature, max_tokens=max_tokens),
    )


async def collect(engine: VllmEngine, request: EngineRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


async def wait_until_idle(engine: VllmEngine) -> None:
    await until(lambda: engine.running_count() == 0, timeout_s=10)


async def test_engine_is_ready_once_started(engine: VllmEngine) -> None:
    assert engine.is_ready()
    assert engine.running_count() == 0


async def test_grammar_vocabulary_is_built_at_start_not_on_the_first_tool_request(engine: VllmEngine) -> None:
    # vLLM caches it on its Mistral tokenizer the first time a grammar request is checked (so this
    # fails only where no earlier test sent one: run the file alone; the test below covers the rest).
    assert engine._llm is not None
    assert "llg_tokenizer" in vars(engine._llm.renderer.tokenizer)


async def test_warming_builds_the_grammar_vocabulary_vllm_caches(tiny_model: TinyModel) -> None:
    from vllm.tokenizers.mistral import MistralTokenizer

    tokenizer = MistralTokenizer.from_pretrained(str(tiny_model.path))
    assert "llg_tokenizer" not in vars(tokenizer)
    warm_grammar_tokenizer(tokenizer)
    assert "llg_tokenizer" in vars(tokenizer)


async def test_deep_health_generates_one_token_on_vllm(engine: VllmEngine, redis_url: str) -> None:
    settings = WorkerSettings(
        redis_url=redis_url,
        health_host="127.0.0.1",
        health_port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        deep_health_interval_s=0.2,
    )
    worker = await start_worker(settings, SessionEngine(engine))
    try:
        await wait_serving(worker.health.port, DEEP_SERVICE, timeout_s=120)
        assert worker.metrics is not None
        assert worker.metrics.registry.get_sample_value("mistral_serve_worker_deep_health_ok") == 1
    finally:
        await worker.stop(grace_s=0)
    await wait_until_idle(engine)  # the check's one-token request leaves nothing behind


async def test_stream_yields_new_tokens_only_and_ends_at_max_tokens(engine: VllmEngine) -> None:
    outputs = await collect(engine, EngineRequest("stream-1", chat("Tell me a story.", 16)))
    assert len(outputs) > 1, "a stream, not one final output"
    assert all(out.token_ids for out in outputs)
    assert [out.finish_reason for out in outputs] == [None] * (len(outputs) - 1) + ["length"]
    token_ids = [t for out in outputs for t in out.token_ids]
    assert len(token_ids) == 16  # deltas: cumulative outputs would add up to far more
    assert outputs[0].prompt_tokens == len(
        engine.prompt_builder.build(chat("Tell me a story.", 16)).token_ids
    )
    text_out = "".join(out.text for out in outputs)
    assert text_out == engine.prompt_builder.tokenizer.decode(token_ids)


async def test_eight_concurrent_requests_run_in_one_batch(engine: VllmEngine) -> None:
    arrivals: list[tuple[str, bool]] = []  # (request id, finished) in the order outputs arrive
    peak = 0

    async def run(i: int) -> int:
        nonlocal peak
        n = 0
        async for out in engine.generate(EngineRequest(f"batch-{i}", chat(f"Request number {i}", 24))):
            peak = max(peak, engine.running_count())
            arrivals.append((f"batch-{i}", out.finish_reason is not None))
            n += len(out.token_ids)
        return n

    counts = await asyncio.gather(*(run(i) for i in range(8)))
    assert counts == [24] * 8
    assert peak == 8, "all eight requests were inside the engine at once"
    # Continuous batching: every request has produced output before the first one finishes.
    first_finish = next(i for i, (_, done) in enumerate(arrivals) if done)
    assert {rid for rid, _ in arrivals[:first_finish]} == {f"batch-{i}" for i in range(8)}
    assert engine.running_count() == 0


async def test_abort_mid_stream_removes_the_request_from_the_engine(engine: VllmEngine) -> None:
    request = EngineRequest("abort-1", chat("Go on forever.", 1500))
    outputs: list[EngineOutput] = []
    async for out in engine.generate(request):
        outputs.append(out)
        if len(outputs) == 3:
            assert engine.running_count() == 1
            await engine.abort("abort-1")
    assert outputs[-1].finish_reason == "abort"
    assert sum(len(o.token_ids) for o in outputs) < 1500
    await wait_until_idle(engine)
    assert engine.running_count() == 0
    await engine.abort("abort-1")  # idempotent
    await engine.abort("never-existed")


async def test_cancelling_the_consumer_aborts_the_request(engine: VllmEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(EngineRequest("cancel-1", chat("Go on forever.", 1500))):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    assert engine.running_count() == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await wait_until_idle(engine)
    assert engine.running_count() == 0


async def test_prompt_over_the_context_raises_request_error_and_engine_stays_up(engine: VllmEngine) -> None:
    long_prompt = "hello " * 4000  # ~4000 tokens; the tiny engine's context is 2048
    with pytest.raises(EngineRequestError, match="context"):
        await collect(engine, EngineRequest("too-long", chat(long_prompt, 8)))
    assert engine.is_ready()
    outputs = await collect(engine, EngineRequest("after-too-long", chat("Still there?", 4)))
    assert outputs[-1].finish_reason == "length"


async def test_max_tokens_of_the_whole_context_is_capped_to_what_the_prompt_leaves(
    engine: VllmEngine,
) -> None:
    context = engine.settings.max_model_len
    request = chat("Short prompt.", context)
    outputs = await collect(engine, EngineRequest("capped", request))
    # Random weights may stop early on </s>; what matters is that vLLM accepted the request.
    assert outputs[-1].finish_reason in ("length", "stop")
    assert sum(len(o.token_ids) for o in outputs) <= context - outputs[-1].prompt_tokens


async def test_max_tokens_alone_over_the_context_is_the_callers_fault(engine: VllmEngine) -> None:
    with pytest.raises(EngineRequestError, match="max_tokens"):
        await collect(engine, EngineRequest("over", chat("Hi", engine.settings.max_model_len + 1)))


async def test_resume_continues_exactly_after_the_tokens_already_sent(engine: VllmEngine) -> None:
    request = chat("Resume me.", 12)
    full = [t for o in await collect(engine, EngineRequest("resume-full", request)) for t in o.token_ids]
    resumed_outputs = await collect(
        engine, EngineRequest("resume-2", request, resume_token_ids=tuple(full[:5]))
    )
    resumed = [t for o in resumed_outputs for t in o.token_ids]
    assert full[:5] + resumed == full
    assert resumed_outputs[-1].finish_reason == "length"
    assert resumed_outputs[0].prompt_tokens == len(engine.prompt_builder.build(request).token_ids)


async def test_bad_conversation_raises_request_error(engine: VllmEngine) -> None:
    bad = pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_TOOL, content=[text("{}")])])
    with pytest.raises(EngineRequestError):
        await collect(engine, EngineRequest("bad", bad))
    assert engine.running_count() == 0


async def test_image_request_streams_with_image_tokens_counted(
    engine: VllmEngine, tiny_model: TinyModel
) -> None:
    request = pb.ChatRequest(
        messages=[
            pb.Message(
                role=pb.ROLE_USER,
                content=[
                    text("Describe:"),
                    pb.ContentPart(image=pb.ImageBytes(data=make_png(), mime_type="image/png")),
                ],
            )
        ],
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=8),
    )
    if not tiny_model.vision:
        # The text-only model's tokenizer has no image config: refused as the caller's fault.
        with pytest.raises(EngineRequestError, match="images"):
            await collect(engine, EngineRequest("image-1", request))
        pytest.skip(VISION_MISSING)
    outputs = await collect(engine, EngineRequest("image-1", request))
    assert outputs[0].image_tokens == 8  # 84x56 px: 3 columns + a break, 2 rows
    assert sum(len(o.token_ids) for o in outputs) == 8


async def test_data_url_image_in_the_front_door_form_runs_like_bytes(
    engine: VllmEngine, tiny_model: TinyModel
) -> None:
    if not tiny_model.vision:
        pytest.skip(VISION_MISSING)
    by_bytes = pb.ContentPart(image=pb.ImageBytes(data=make_png(), mime_type="image/png"))
    by_url = pb.ContentPart(image_url=data_url(make_png()))
    results = []
    for i, part in enumerate((by_bytes, by_url)):
        request = pb.ChatRequest(
            messages=[pb.Message(role=pb.ROLE_USER, content=[text("Describe:"), part])],
            sampling=pb.SamplingParams(temperature=0.0, max_tokens=8),
        )
        queued = form_of(request).request
        results.append(
            [t for o in await collect(engine, EngineRequest(f"img-{i}", queued)) for t in o.token_ids]
        )
    assert results[0] == results[1]
