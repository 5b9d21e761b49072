"""Property test of the HTTP door's bodies: random bytes, random JSON, a valid body with fields of the
wrong type, huge numbers, deep nesting and huge strings never get a 500 and never hang, and a valid
request sent alongside completes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import Stack
from tests.integration.test_front_door import front_door, tiny_token_counter
from tests.integration.test_openai_http import body

VALID = body("weather?", max_tokens=4, tools=[{"type": "function", "function": {"name": "f"}}])
FIELDS = [
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "presence_penalty",
    "priority",
    "user",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
huge = st.sampled_from([10**30, -(10**30), 1e308, 2**64, 2**32, -1, "x" * 200_000, [[[[[]]]]] * 1000])


def nested(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


@st.composite
def wrong_field(draw: st.DrawFn) -> bytes:
    out: dict[str, Any] = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 3))):
        value = draw(st.one_of(json_values, huge))
        where = draw(st.sampled_from(["top", "message", "part"]))
        messages = out.get("messages")
        if where != "top" and not (isinstance(messages, list) and messages and isinstance(messages[0], dict)):
            continue  # an earlier mutation replaced the messages
        if where == "top":
            out[draw(st.sampled_from(FIELDS))] = value
        elif where == "message":
            out["messages"][0][draw(st.sampled_from(["role", "content", "tool_calls", "tool_call_id"]))] = (
                value
            )
        else:
            out["messages"][0]["content"] = [
                {"type": draw(st.sampled_from(["text", "image_url", "x"])), "text": value, "image_url": value}
            ]
    return json.dumps(out).encode()


bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    wrong_field(),
    st.sampled_from([nested(100_000), nested(500), b"9" * 100_000, b'"' + b"a" * 500_000 + b'"']),
    # Escapes that decode to no Unicode text (lone surrogates), where a string is expected.
    st.sampled_from(["content", "role", "model"]).map(
        lambda key: json.dumps(VALID).replace(f'"{key}": "', f'"{key}": "\\ud800', 1).encode()
    ),
)


async def test_random_bodies_never_get_a_500_and_a_valid_request_alongside_completes(stack: Stack) -> None:
    frontend = await front_door(stack, tiny_token_counter(), api_keys=(), context_length=131072)
    await stack.worker()
    examples: list[bytes] = []

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(bodies)
    def collect(raw: bytes) -> None:
        examples.append(raw)

    collect()
    target = f"http://127.0.0.1:{frontend.http_port}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def send(raw: bytes) -> int:
            async with http.post(target, data=raw, headers={"Content-Type": "application/json"}) as response:
                if response.status != 200:
                    assert "error" in await response.json()
                else:
                    await response.read()
                return response.status

        async def good() -> dict[str, Any]:
            async with http.post(target, json=body("still served", max_tokens=4)) as response:
                assert response.status == 200
                answer: dict[str, Any] = await response.json()
                return answer

        statuses, answer = await asyncio.gather(asyncio.gather(*(send(b) for b in examples)), good())
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    assert set(statuses) <= {200, 400, 404, 413}, sorted(set(statuses))
    assert 400 in statuses
    assert answer["choices"][0]["message"]["content"].startswith("still served")
