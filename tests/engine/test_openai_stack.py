"""The HTTP door over the whole stack with real vLLM: two frontend processes, one vLLM worker process
(the tiny model), a real redis-server; the real `openai` package for the model card's calls, raw HTTP
for the protocol (SIGKILL of a frontend mid-stream, then a resume on the other by Last-Event-ID).

Where the vision route is installed (`make setup`; README, "The model on a CPU") the tiny model is
the vision one and the model card's image part goes as a `data:` URL; in a venv set up with
`VISION=0` it is left out. The tiny model has random weights and never stops by itself, so the first example's
`max_tokens=131072` (accepted: it fits the 131072 context) is streamed and cancelled after a few
chunks rather than waited out, and the second example gets `max_tokens=64`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from devtools.local_stack import LocalStack
from tests.conftest import REPO
from tests.engine.conftest import TinyModel
from tests.engine.vllm_env import tiny_engine_env
from tests.integration.front_door_cases import SMALL_PNG, data_url
from tests.support.sse import joined_text, read_events

MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
CONTEXT = 131072


@dataclass
class Door:
    process: Any
    grpc_port: int
    http_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"


@dataclass
class HttpStack:
    doors: list[Door]
    vision: bool


@pytest.fixture(scope="module")
def http_stack(tiny_model: TinyModel) -> Iterator[HttpStack]:
    tmp = Path(tempfile.mkdtemp(prefix="openai-stack-"))
    stack = LocalStack({**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}, tmp)
    try:
        redis_server = stack.start_redis()
        common = {
            "redis_url": redis_server.url,
            "log_format": "json",
            "MISTRAL_SERVE_MAX_MODEL_LEN": str(CONTEXT),
            "MISTRAL_SERVE_DETACH_GRACE_S": "5",
        }
        # The tiny engine's settings, but the served context of the real model (common's wins).
        worker = stack.start("worker", **{**tiny_engine_env(str(tiny_model.path)), **common}, engine="vllm")
        frontends = [
            stack.start(
                "frontend",
                **common,
                MISTRAL_SERVE_TOKENIZER=str(tiny_model.path / "tekken.json"),
                MISTRAL_SERVE_MODEL=MODEL,  # the name callers use; the worker loads the tiny model's path
            )
            for _ in range(2)
        ]
        asyncio.run(stack.ready_all([worker, *frontends], timeout_s=600))
        doors = [Door(f.process, f.ports["grpc"], f.ports["http"]) for f in frontends]
        yield HttpStack(doors, tiny_model.vision)
    finally:
        stack.stop_all(grace_s=30, sig=signal.SIGKILL)


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        yield session


def user_content(stack: HttpStack, text: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if stack.vision:
        parts.append({"type": "image_url", "image_url": {"url": data_url(SMALL_PNG)}})
    return parts


async def test_the_model_card_s_image_analysis_call(
    http_stack: HttpStack, http: aiohttp.ClientSession
) -> None:
    door = http_stack.doors[0]
    messages: Any = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": user_content(http_stack, "What is the best move here?")},
    ]
    stream: Any
    async with AsyncOpenAI(base_url=door.base_url, api_key="EMPTY") as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0.15,
            max_tokens=131072,
            stream=True,
        )
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 4:
                break
        await stream.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices[0].delta.content for c in chunks[1:])
    async with http.post(f"{door.base_url}/chat/completions/{chunks[0].id}/cancel") as cancelled:
        assert cancelled.status == 200


async def test_the_model_card_s_calculator_call_and_its_tool_call_loop(http_stack: HttpStack) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "my_calculator",
                "description": "evaluate a math expression",
                "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
            },
        }
    ]
    messages: Any = [{"role": "user", "content": user_content(http_stack, "Compute every expression")}]
    async with AsyncOpenAI(base_url=http_stack.doors[0].base_url, api_key="EMPTY") as client:
        response = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=tools,
            tool_choice="auto",
            max_tokens=64,
        )
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert response.usage is not None and response.usage.prompt_tokens > 0
    tool_call: Any
    for tool_call in choice.message.tool_calls or []:  # the model card's loop, as written there
        if tool_call.function.name == "my_calculator":
            json.loads(tool_call.function.arguments)


async def test_streamed_and_whole_greedy_answers_agree_with_usage(http_stack: HttpStack) -> None:
    request: Any = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about queues"}],
        "temperature": 0,
        "max_tokens": 24,
    }
    async with AsyncOpenAI(base_url=http_stack.doors[1].base_url, api_key="EMPTY") as client:
        whole = await client.chat.completions.create(**request)
        stream = await client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


async def test_sigkill_of_a_frontend_mid_stream_then_resume_on_the_other(
    http_stack: HttpStack, http: aiohttp.ClientSession
) -> None:
    first, second = http_stack.doors
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story"}],
        "temperature": 0,
        "max_tokens": 160,
        "stream": True,
    }
    async with http.post(f"{second.base_url}/chat/completions", json=request) as response:
        undisturbed = await read_events(response)
    async with http.post(f"{first.base_url}/chat/completions", json=request) as response:
        head = await read_events(response, stop_after=4)
        first.process.kill()  # SIGKILL: no drain, no goodbye
        first.process.wait(timeout=30)
    last_id = head[-1].id
    assert last_id is not None
    async with http.post(
        f"{second.base_url}/chat/completions", json=request, headers={"Last-Event-ID": last_id}
    ) as response:
        assert response.status == 200, await response.text()
        tail = await read_events(response)
    sequences = [int(e.id.rpartition("/")[2]) for e in head + tail if e.id is not None]
    assert sequences == list(range(len(sequences))), "no gap and no duplicate"
    assert tail[-1].data == "[DONE]"
    assert joined_text(head + tail) == joined_text(undisturbed)
