"""Greedy output through the whole stack (frontend -> Redis -> worker -> vLLM) equals vLLM offline.

The worker writes the engine's token ids beside the deltas (its resume record), so the tokens that
went through the stack are read back from Redis and compared with `LLM.chat`, token for token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from mistral_serve.client import ChatClient
from mistral_serve.common import keys
from mistral_serve.frontend.server import start_frontend
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.worker.app import start_worker
from mistral_serve.worker.engine import EngineOutput, EngineRequest
from mistral_serve.worker.settings import WorkerSettings
from mistral_serve.worker.vllm_engine import VllmEngine
from tests.engine.conftest import TinyModel
from tests.engine.conversations import Conversation, all_conversations

CONVERSATIONS = all_conversations()


class SessionEngine:
    """The session's VllmEngine, lent to one worker: the worker's stop must not shut it down."""

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine

    async def start(self) -> None:
        await self._engine.start()

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        return self._engine.generate(request)

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    def is_ready(self) -> bool:
        return self._engine.is_ready()

    def running_count(self) -> int:
        return self._engine.running_count()

    async def shutdown(self) -> None:
        """Left to the session fixture."""


@pytest.mark.asyncio(loop_scope="session")
async def test_greedy_tokens_through_the_stack_equal_vllm_offline(
    tiny_model: TinyModel, vllm_reference: dict[str, Any], engine: VllmEngine, redis_url: str
) -> None:
    runnable = [c for c in CONVERSATIONS if tiny_model.vision or not c.needs_vision]
    assert runnable
    frontend = await start_frontend(
        FrontendSettings(redis_url=redis_url, grpc_host="127.0.0.1", grpc_port=0, metrics_port=0)
    )
    worker = await start_worker(
        WorkerSettings(redis_url=redis_url, health_host="127.0.0.1", health_port=0, metrics_port=0),
        SessionEngine(engine),
    )
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with ChatClient(f"127.0.0.1:{frontend.port}") as chat_client:
            for conversation in runnable:
                await check_conversation(chat_client, client, conversation, vllm_reference)
    finally:
        await client.aclose()
        await worker.stop(grace_s=0)
        await frontend.stop(grace_s=0)


async def check_conversation(
    chat_client: ChatClient, client: aioredis.Redis, conversation: Conversation, reference: dict[str, Any]
) -> None:
    expected = reference["greedy"][conversation.name]
    request = type(conversation.chat)()
    request.CopyFrom(conversation.chat)
    request.sampling.temperature = 0.0
    events = [e async for e in chat_client.stream(request, timeout_s=120)]
    assert events[-1].WhichOneof("event") == "finished", (conversation.name, events[-1])
    request_id = events[0].started.request_id
    records = [
        queue_pb2.EventRecord.FromString(fields[keys.EVENT_FIELD.encode()])
        for _, fields in await client.xrange(keys.events_stream(request_id))
    ]
    streamed_tokens = [t for record in records for t in record.token_ids]
    finished = events[-1].finished
    assert finished.usage.completion_tokens == len(expected["token_ids"]), conversation.name
    # Tokens the parser still held back at the end are counted in usage but not in any delta record.
    assert streamed_tokens == expected["token_ids"][: len(streamed_tokens)], conversation.name
    if not finished.tool_calls:
        text = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
        assert text == expected["text"], conversation.name
        assert streamed_tokens == expected["token_ids"], conversation.name
