"""Our prompts and streamed tokens equal vLLM's own chat path and offline greedy output."""

from __future__ import annotations

from typing import Any

import pytest

from mistral_serve.common.prompts import PromptBuilder
from mistral_serve.frontend.token_count import TokenCounter
from mistral_serve.v1 import chat_pb2
from mistral_serve.worker.engine import EngineRequest
from mistral_serve.worker.vllm_engine import VllmEngine
from tests.engine.conftest import TinyModel
from tests.engine.conversations import Conversation, all_conversations, data_url
from tests.engine.tiny_model import VISION_MISSING
from tests.integration.test_front_door import form_of

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


def test_the_default_system_prompt_is_what_differs_when_switched_on(
    tiny_model: TinyModel, vllm_reference: dict[str, Any]
) -> None:
    """Switched on (the service's default), a conversation with no SYSTEM message gets the model's;
    one that has its own gets none, so it still equals vLLM's prompt."""
    builder = PromptBuilder.from_model(str(tiny_model.tokenizer_with_images))
    for conversation in CONVERSATIONS:
        chat = chat_pb2.ChatRequest()
        chat.CopyFrom(conversation.chat)
        chat.ClearField("default_system_prompt")
        ids = builder.build(chat).token_ids
        has_system = any(m.role == chat_pb2.ROLE_SYSTEM for m in chat.messages)
        reference = vllm_reference["chat_prompt_ids"][conversation.name]
        assert (ids == reference) == has_system, conversation.name
        if not has_system:
            assert str(builder.default_system_prompt()) in builder.tokenizer.decode(ids)


def as_the_caller_sent_it(chat: chat_pb2.ChatRequest) -> chat_pb2.ChatRequest:
    """`chat` with its images as data: URLs, as an OpenAI-style caller sends them."""
    sent = chat_pb2.ChatRequest()
    sent.CopyFrom(chat)
    for message in sent.messages:
        for part in message.content:
            if part.WhichOneof("kind") == "image":
                part.image_url = data_url(part.image.data, part.image.mime_type)
    return sent


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=IDS)
def test_the_front_doors_count_equals_vllms_prompt(
    conversation: Conversation, tiny_model: TinyModel, vllm_reference: dict[str, Any]
) -> None:
    counter = TokenCounter(PromptBuilder.from_model(str(tiny_model.tokenizer_with_images)))
    counted = counter(form_of(as_the_caller_sent_it(conversation.chat)))
    assert counted.prompt_tokens == len(vllm_reference["chat_prompt_ids"][conversation.name])


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=IDS)
async def test_greedy_stream_equals_vllm_offline_chat(
    conversation: Conversation, tiny_model: TinyModel, vllm_reference: dict[str, Any], engine: VllmEngine
) -> None:
    if conversation.needs_vision and not tiny_model.vision:
        pytest.skip(VISION_MISSING)
    expected = vllm_reference["greedy"][conversation.name]
    built = engine.prompt_builder.build(conversation.chat)
    assert built.token_ids == expected["prompt_token_ids"]
    streamed: list[int] = []
    async for out in engine.generate(EngineRequest(f"fidelity-{conversation.name}", conversation.chat)):
        streamed.extend(out.token_ids)
    assert streamed == expected["token_ids"]
    assert len(streamed) > 0


TEXT_CONVERSATIONS = [c for c in CONVERSATIONS if not c.needs_vision]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("conversation", TEXT_CONVERSATIONS, ids=[c.name for c in TEXT_CONVERSATIONS])
async def test_the_front_doors_ids_run_by_the_engine_give_vllms_greedy_output(
    conversation: Conversation, tiny_model: TinyModel, vllm_reference: dict[str, Any], engine: VllmEngine
) -> None:
    # The front door's counter for the model the engine runs: the worker takes its ids as the prompt.
    counter = TokenCounter.from_tokenizer_file(
        str(tiny_model.path / "tekken.json"), model_name=str(tiny_model.path)
    )
    assert counter.fingerprint == engine.prompt_builder.fingerprint
    expected = vllm_reference["greedy"][conversation.name]
    ids = counter.encode(form_of(conversation.chat))
    assert ids == expected["prompt_token_ids"]
    request = EngineRequest(
        f"counted-{conversation.name}",
        conversation.chat,
        prompt_token_ids=ids,
        prompt_fingerprint=counter.fingerprint,
    )
    streamed = [token for out in [o async for o in engine.generate(request)] for token in out.token_ids]
    assert streamed == expected["token_ids"]
