"""Our prompts and streamed tokens equal vLLM's own chat path and offline greedy output."""

from __future__ import annotations

from typing import Any

import pytest

from mistral_serve.common.prompts import PromptBuilder
from mistral_serve.worker.engine import EngineRequest
from mistral_serve.worker.vllm_engine import VllmEngine
from tests.engine.conftest import TinyModel
from tests.engine.conversations import Conversation, all_conversations

CONVERSATIONS = all_conversations()
IDS = [c.name for c in CONVERSATIONS]


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=IDS)
def test_prompt_ids_equal_vllm_chat_rendering(
    conversation: Conversation, tiny_model: TinyModel, vllm_reference: dict[str, Any]
) -> None:
    # The image case uses a tokenizer with the image config even where the model runs text only.
    builder = PromptBuilder.from_model(str(tiny_model.tokenizer_with_images))
    built = builder.build(conversation.chat)
    assert built.token_ids == vllm_reference["chat_prompt_ids"][conversation.name]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=IDS)
async def test_greedy_stream_equals_vllm_offline_chat(
    conversation: Conversation, tiny_model: TinyModel, vllm_reference: dict[str, Any], engine: VllmEngine
) -> None:
    if conversation.needs_vision and not tiny_model.vision:
        pytest.skip("vision cannot load on this CPU build (see tiny_model.vision_runtime_available)")
    expected = vllm_reference["greedy"][conversation.name]
    built = engine.prompt_builder.build(conversation.chat)
    assert built.token_ids == expected["prompt_token_ids"]
    streamed: list[int] = []
    async for out in engine.generate(EngineRequest(f"fidelity-{conversation.name}", conversation.chat)):
        streamed.extend(out.token_ids)
    assert streamed == expected["token_ids"]
    assert len(streamed) > 0
