"""Greedy output through the whole stack (frontend -> Redis -> worker -> vLLM) equals vLLM offline.

The worker writes the engine's token ids beside the deltas (its resume record), so the tokens that
went through the stack are read back from Redis and compared with `LLM.chat`, token for token.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from mistral_serve.common import keys
from mistral_serve.frontend.server import start_frontend
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2
from mistral_serve.worker.app import start_worker
from mistral_serve.worker.settings import WorkerSettings
from mistral_serve.worker.tool_calls import ARGS_TOKEN, TOOL_CALLS_TOKEN
from mistral_serve.worker.vllm_engine import VllmEngine
from tests.engine.conftest import TinyModel
from tests.engine.conversations import Conversation, all_conversations
from tests.engine.session_engine import SessionEngine
from tests.support import raw_stream
from tests.support.raw_stream import raw_events

CONVERSATIONS = all_conversations()


@pytest.mark.asyncio(loop_scope="session")
async def test_greedy_tokens_through_the_stack_equal_vllm_offline(
    tiny_model: TinyModel, vllm_reference: dict[str, Any], engine: VllmEngine, redis_url: str
) -> None:
    runnable = [c for c in CONVERSATIONS if tiny_model.vision or not c.needs_vision]
    assert runnable
    frontend = await start_frontend(
        FrontendSettings(redis_url=redis_url, grpc_host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=0)
    )
    worker = await start_worker(
        WorkerSettings(redis_url=redis_url, health_host="127.0.0.1", health_port=0, metrics_port=0),
        SessionEngine(engine),
    )
    client = aioredis.Redis.from_url(redis_url)
    try:
        for conversation in runnable:
            await check_conversation(frontend.port, client, conversation, vllm_reference)
    finally:
        await client.aclose()
        await worker.stop(grace_s=0)
        await frontend.stop(grace_s=0)


async def check_conversation(
    port: int, client: aioredis.Redis, conversation: Conversation, reference: dict[str, Any]
) -> None:
    expected = reference["greedy"][conversation.name]
    request = type(conversation.chat)()
    request.CopyFrom(conversation.chat)
    request.sampling.temperature = 0.0
    events = await raw_events(port, raw_stream.start(request), timeout_s=120)
    assert events[-1].WhichOneof("event") == "finished", (conversation.name, events[-1])
    request_id = events[0].started.request_id
    records = [
        queue_pb2.EventRecord.FromString(fields[keys.EVENT_FIELD.encode()])
        for _, fields in await client.xrange(keys.events_stream("default", request_id))
    ]
    streamed_tokens = [t for record in records for t in record.token_ids]
    finished = events[-1].finished
    assert finished.usage.completion_tokens == len(expected["token_ids"]), conversation.name
    # Tokens the parser still held back at the end are counted in usage but not in any delta record.
    assert streamed_tokens == expected["token_ids"][: len(streamed_tokens)], conversation.name
    # A parsed tool call is compared too, as the model wrote it (vLLM's text keeps the markers).
    assert model_text(events) == expected["text"], conversation.name
    if not finished.tool_calls:
        assert streamed_tokens == expected["token_ids"], conversation.name


def model_text(events: list[chat_pb2.ChatEvent]) -> str:
    """The model's raw output from the deltas: their text, and each tool call as
    `[TOOL_CALLS]name[ARGS]` followed by its argument fragments as they were streamed."""
    parts: list[str] = []
    for event in events:
        if event.WhichOneof("event") != "delta":
            continue
        parts.append(event.delta.text)
        for call in event.delta.tool_calls:
            if call.name:  # a call's first fragment names it
                parts.append(f"{TOOL_CALLS_TOKEN}{call.name}{ARGS_TOKEN}")
            parts.append(call.arguments_fragment)
    return "".join(parts)
