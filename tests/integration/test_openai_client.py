"""The real `openai` package against the HTTP door (real frontend, Redis, scripted workers): the model
card's calls with only `base_url` changed, streaming and not, include_usage, tool calls, and a 429
that the client's own retry waits out."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from openai import AsyncOpenAI, RateLimitError

from mistral_serve.frontend.server import Frontend
from tests.integration.conftest import Stack
from tests.integration.test_openai_http import CALC_TOOL, MODEL, TOOL_CALL_TEXT
from tests.support.scripted_engine import ScriptedEngine
from tests.support.waiting import until


def client(frontend: Frontend, **kwargs: object) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{frontend.http_port}/v1", api_key="EMPTY", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def door(stack: Stack) -> Frontend:
    frontend = await stack.frontend()
    await stack.worker()
    return frontend


async def test_a_completion_and_a_stream_through_the_openai_client(door: Frontend) -> None:
    async with client(door) as openai:
        response = await openai.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "you are brief"},
                {"role": "user", "content": [{"type": "text", "text": "same words"}]},
            ],
            temperature=0.15,
            max_tokens=6,
        )
        stream = await openai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "text", "text": "same words"}]}],
            temperature=0.15,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert response.choices[0].message.content == "same words w1 w2 w3 w4"
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == response.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 6


async def test_the_model_card_s_tool_call_loop_runs_unchanged(stack: Stack) -> None:
    frontend = await stack.frontend()
    await stack.worker(ScriptedEngine(default_tokens=len(TOOL_CALL_TEXT.split())))
    tools: Any = [CALC_TOOL]
    async with client(frontend) as openai:
        response = await openai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "text", "text": TOOL_CALL_TEXT}]}],
            tools=tools,
            tool_choice="auto",
        )
    results = []
    tool_call: Any  # the model card's loop, as written there
    for tool_call in response.choices[0].message.tool_calls or []:
        if tool_call.function.name == "my_calculator":
            expression = json.loads(tool_call.function.arguments)["expression"]
            results.append(eval(expression))
    assert results == [10]
    assert response.choices[0].finish_reason == "tool_calls"


async def test_a_429_is_waited_out_by_the_client_s_own_retry(stack: Stack) -> None:
    frontend = await stack.frontend(max_backlog=1, retry_after_s=0.5)
    async with client(frontend, max_retries=0) as impatient, client(frontend, max_retries=5) as patient:
        blocker = await patient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "first"}], max_tokens=3, stream=True
        )
        first = await blocker.__anext__()  # admitted and waiting: no worker yet
        with pytest.raises(RateLimitError) as refused:
            await impatient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert refused.value.response.headers["retry-after-ms"] == "500"
        # The patient client is refused too, waits retry-after-ms, retries; a worker then frees the slot.
        second = asyncio.create_task(
            patient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "second"}], max_tokens=3
            )
        )
        await until(lambda: frontend.metrics is not None and refused_count(frontend) >= 2)
        await stack.worker()
        answer = await second
        rest = [chunk async for chunk in blocker]
    assert first.choices[0].delta.role == "assistant"
    assert answer.choices[0].message.content == "second w1 w2"
    assert rest[-1].choices[0].finish_reason == "length"


def refused_count(frontend: Frontend) -> float:
    assert frontend.metrics is not None
    labels = {"door": "http", "method": "ChatCompletions", "outcome": "error", "code": "RESOURCE_EXHAUSTED"}
    return frontend.metrics.registry.get_sample_value("mistral_serve_requests_total", labels) or 0.0
