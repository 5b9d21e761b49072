"""Images through the whole stack on the real engine: frontend -> Redis -> worker -> vLLM's Pixtral.

Runs wherever the vision route is installed (`make setup`; README, "The model on a CPU"); skipped only
where it is not, with the reason. The frontend counts the prompt with its tokenizer (CountTokens, and the
budget), the worker builds it with the same PromptBuilder and hands vLLM the decoded images: the two
counts, and vLLM's own prompt for the same chat (`LLM.chat`, from the reference run), must agree.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from mistral_serve.frontend.__main__ import token_counter
from mistral_serve.frontend.server import start_frontend
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from mistral_serve.worker.app import start_worker
from mistral_serve.worker.settings import WorkerSettings
from mistral_serve.worker.vllm_engine import VllmEngine
from tests.engine.conftest import TinyModel
from tests.engine.conversations import Conversation, image_conversation, two_images_conversation
from tests.engine.session_engine import SessionEngine
from tests.engine.tiny_model import VISION_MISSING
from tests.support import raw_stream
from tests.support.raw_stream import raw_events

# Image tokens of the conversations' images: 84x56 px is 3 columns (+ a break) x 2 rows = 8;
# 56x84 px is 2 columns (+ a break) x 3 rows = 9.
CASES = [(image_conversation(), 8), (two_images_conversation(), 8 + 9)]


@pytest.mark.asyncio(loop_scope="session")
async def test_chats_with_one_and_two_images_finish_with_their_image_tokens_counted(
    tiny_model: TinyModel, vllm_reference: dict[str, Any], engine: VllmEngine, redis_url: str
) -> None:
    if not tiny_model.vision:
        pytest.skip(VISION_MISSING)
    settings = FrontendSettings(
        redis_url=redis_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        http_port=0,
        tokenizer_path=str(tiny_model.path / "tekken.json"),
    )
    frontend = await start_frontend(settings, token_counter(settings))
    worker = await start_worker(
        WorkerSettings(redis_url=redis_url, health_host="127.0.0.1", health_port=0, metrics_port=0),
        SessionEngine(engine),
    )
    try:
        for conversation, image_tokens in CASES:
            # The worker's prompt for this chat is vLLM's own, token for token.
            vllm_prompt = vllm_reference["greedy"][conversation.name]["prompt_token_ids"]
            assert engine.prompt_builder.build(conversation.chat).token_ids == vllm_prompt
            await check_image_chat(frontend.port, conversation, image_tokens, vllm_reference)
    finally:
        await worker.stop(grace_s=0)
        await frontend.stop(grace_s=0)


async def check_image_chat(
    port: int, conversation: Conversation, image_tokens: int, reference: dict[str, Any]
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        counted = await stub.CountTokens(chat_pb2.CountTokensRequest(request=conversation.chat), timeout=60)
    events = await raw_events(port, raw_stream.start(conversation.chat), timeout_s=180)
    assert events[0].WhichOneof("event") == "started", conversation.name
    assert events[-1].WhichOneof("event") == "finished", (conversation.name, events[-1])
    usage = events[-1].finished.usage
    vllm_run = reference["greedy"][conversation.name]
    assert (usage.prompt_tokens, usage.image_tokens) == (counted.prompt_tokens, counted.image_tokens)
    assert usage.image_tokens == image_tokens, conversation.name
    assert usage.prompt_tokens == len(vllm_run["prompt_token_ids"]), conversation.name
    assert usage.completion_tokens == len(vllm_run["token_ids"]), conversation.name
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert [d.sequence for d in deltas] == list(range(1, len(deltas) + 1))
    # What the model saw shows in what it wrote: vLLM's own run on the same images wrote the same.
    assert not any(d.tool_calls for d in deltas), conversation.name
    assert "".join(d.text for d in deltas) == vllm_run["text"], conversation.name
