"""Enforced tool choice and response format with real vLLM, through frontend -> Redis -> worker.

The tiny model has random weights: without the grammar it never writes a call or valid JSON, so every
valid one here is the grammar's doing. Each scenario runs its seeds as concurrent requests on one stack.
The schemas hold enums, booleans and bounded numbers (a random model rarely closes a free string).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
import pytest_asyncio

from mistral_serve.v1 import chat_pb2
from mistral_serve.worker.engine import EngineRequest
from mistral_serve.worker.vllm_engine import VllmEngine
from tests.engine.session_engine import session_stack
from tests.integration.front_door_cases import json_format
from tests.support import raw_stream
from tests.support.raw_stream import raw_events

R = chat_pb2
Mode = R.ToolChoice.Mode
SEEDS = range(20)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "metric": {"type": "boolean"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "metric", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [
    R.Tool(name=name, description=name, parameters_json_schema=json.dumps(s)) for name, s in SCHEMAS.items()
]
ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "boolean"}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "score"],
    "additionalProperties": False,
}

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def port(engine: VllmEngine, redis_url: str) -> AsyncIterator[int]:
    async with session_stack(engine, redis_url) as frontend:
        yield frontend.port


def chat(seed: int, max_tokens: int = 96, **fields: Any) -> R.ChatRequest:
    return R.ChatRequest(
        messages=[R.Message(role=R.ROLE_USER, content=[R.ContentPart(text="What is the weather in Paris?")])],
        sampling=R.SamplingParams(seed=seed, max_tokens=max_tokens),
        **fields,
    )


async def run_all(port: int, requests: list[R.ChatRequest]) -> list[list[R.ChatEvent]]:
    return list(
        await asyncio.gather(*(raw_events(port, raw_stream.start(r), timeout_s=300) for r in requests))
    )


def finished(events: list[R.ChatEvent]) -> R.Finished:
    assert events[-1].WhichOneof("event") == "finished", events[-1]
    return events[-1].finished


def text_of(events: list[R.ChatEvent]) -> str:
    return "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")


def streamed_calls(events: list[R.ChatEvent]) -> list[R.FunctionCall]:
    """The calls as the deltas streamed them: id and name first, then argument fragments."""
    calls: dict[int, R.FunctionCall] = {}
    for event in events:
        for fragment in event.delta.tool_calls if event.WhichOneof("event") == "delta" else ():
            call = calls.setdefault(fragment.index, R.FunctionCall())
            if fragment.name:
                call.id, call.name = fragment.id, fragment.name
            call.arguments_json += fragment.arguments_fragment
    return [calls[i] for i in sorted(calls)]


def assert_valid_calls(events: list[R.ChatEvent], names: set[str]) -> list[R.FunctionCall]:
    done = finished(events)
    assert done.finish_reason == R.FINISH_REASON_TOOL_CALLS, (done, text_of(events))
    assert done.tool_calls, done
    for call in done.tool_calls:
        assert call.name in names, call
        jsonschema.validate(json.loads(call.arguments_json), SCHEMAS[call.name])
    assert streamed_calls(events) == list(done.tool_calls)
    return list(done.tool_calls)


async def test_any_makes_one_valid_call_of_a_request_tool_for_every_seed(port: int) -> None:
    any_ = R.ToolChoice(mode=Mode.MODE_ANY)
    runs = await run_all(
        port, [chat(s, tools=TOOLS, tool_choice=any_, parallel_tool_calls=False) for s in SEEDS]
    )
    for events in runs:
        assert len(assert_valid_calls(events, set(SCHEMAS))) == 1
        assert text_of(events).strip() == "", "the grammar leaves room for blanks only, around the call"


async def test_any_with_parallel_calls_makes_only_valid_calls(port: int) -> None:
    any_ = R.ToolChoice(mode=Mode.MODE_ANY)
    runs = await run_all(port, [chat(s, max_tokens=256, tools=TOOLS, tool_choice=any_) for s in range(6)])
    for events in runs:
        assert_valid_calls(events, set(SCHEMAS))
    assert any(len(finished(events).tool_calls) > 1 for events in runs), "parallel calls are allowed"


async def test_function_choice_always_calls_that_function(port: int) -> None:
    named = R.ToolChoice(mode=Mode.MODE_FUNCTION, function_name="get_time")
    runs = await run_all(port, [chat(s, tools=TOOLS, tool_choice=named) for s in range(10)])
    for events in runs:
        assert {c.name for c in assert_valid_calls(events, {"get_time"})} == {"get_time"}


async def test_none_never_calls(port: int) -> None:
    none = R.ToolChoice(mode=Mode.MODE_NONE)
    runs = await run_all(port, [chat(s, max_tokens=24, tools=TOOLS, tool_choice=none) for s in range(10)])
    for events in runs:
        done = finished(events)
        assert done.finish_reason != R.FINISH_REASON_TOOL_CALLS and not done.tool_calls, done
        assert not streamed_calls(events)
        assert "[TOOL_CALLS]" not in text_of(events), "the grammar keeps the call token out of the text"


async def test_json_schema_answers_validate_for_every_seed(port: int) -> None:
    fmt = json_format(json.dumps(ANSWER))
    runs = await run_all(port, [chat(s, response_format=fmt) for s in SEEDS])
    for events in runs:
        assert finished(events).finish_reason == R.FINISH_REASON_STOP, text_of(events)
        jsonschema.validate(json.loads(text_of(events)), ANSWER)


async def test_json_object_answers_are_objects(port: int) -> None:
    """Any JSON object. Its keys and strings are free, which the tiny model never closes by itself:
    the engine's bounds (MISTRAL_SERVE_JSON_MAX_STRING, MISTRAL_SERVE_JSON_MAX_DEPTH, set for the tiny
    model in `tiny_engine_env`) make every seed close its object well within the token limit."""
    fmt = R.ResponseFormat(type=R.ResponseFormat.TYPE_JSON_OBJECT)
    runs = await run_all(port, [chat(s, max_tokens=64, response_format=fmt) for s in SEEDS])
    for events in runs:
        assert finished(events).finish_reason == R.FINISH_REASON_STOP, text_of(events)
        assert isinstance(json.loads(text_of(events)), dict), text_of(events)


async def test_a_resumed_enforced_call_is_the_same_call(engine: VllmEngine) -> None:
    """A worker that takes over mid-call regenerates the streamed tokens and goes on with the same
    call: the resumed run's new tokens are exactly the rest of the first run's."""
    request = chat(3, tools=TOOLS, tool_choice=R.ToolChoice(mode=Mode.MODE_ANY), parallel_tool_calls=False)
    first = [o async for o in engine.generate(EngineRequest("resume-enforced", request))]
    tokens = tuple(t for o in first for t in o.token_ids)
    text = "".join(o.text for o in first)
    assert "[ARGS]" in text and len(tokens) > 8
    cut = len(tokens) // 2  # inside the call's arguments
    second = [
        o
        async for o in engine.generate(
            EngineRequest("resume-enforced", request, resume_token_ids=tokens[:cut])
        )
    ]
    assert tuple(t for o in second for t in o.token_ids) == tokens[cut:]
    assert second[-1].finish_reason == "stop"
