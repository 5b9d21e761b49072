"""The load tool's prompt mix: short text, an inline image, tools, long context. Deterministic per index."""

from __future__ import annotations

import json
import random
import struct
import zlib
from collections.abc import Callable
from functools import cache

from mistral_serve.v1 import chat_pb2

KINDS = ("text", "image", "tools", "long")
_WORDS = [
    "queue",
    "stream",
    "token",
    "worker",
    "frontend",
    "latency",
    "cache",
    "batch",
    "model",
    "request",
    "deadline",
    "redis",
    "grpc",
    "vision",
    "image",
    "tool",
    "weather",
    "city",
    "forecast",
    "answer",
    "question",
    "story",
    "river",
    "mountain",
    "engine",
]
_WEATHER_TOOL = chat_pb2.Tool(
    name="get_weather",
    description="Current weather of a city.",
    parameters_json_schema=json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        }
    ),
)


def parse_mix(text: str) -> dict[str, float]:
    """`text=0.7,image=0.1,tools=0.1,long=0.1` as normalised weights."""
    mix: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, weight = item.partition("=")
        if kind not in KINDS:
            raise SystemExit(f"unknown prompt kind {kind!r}; kinds are {', '.join(KINDS)}")
        mix[kind] = float(weight or 1)
    total = sum(mix.values())
    if total <= 0:
        raise SystemExit("the prompt mix needs a positive weight")
    return {kind: weight / total for kind, weight in mix.items()}


@cache
def png(side: int = 32) -> bytes:
    """A small valid RGB PNG, built here so the load tool needs no imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(
        b"\x00" + b"".join(bytes(((x * 8) % 256, (y * 8) % 256, 128)) for x in range(side))
        for y in range(side)
    )
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def make_request(
    kind: str, index: int, *, max_tokens: int, long_words: int = 3000, temperature: float = 0.0
) -> chat_pb2.ChatRequest:
    rng = random.Random(index)
    parts = [chat_pb2.ContentPart(text=f"Request {index}: {_words(rng, 12)}")]
    tools: list[chat_pb2.Tool] = []
    if kind == "image":
        parts.append(chat_pb2.ContentPart(image=chat_pb2.ImageBytes(data=png(), mime_type="image/png")))
    elif kind == "tools":
        parts = [chat_pb2.ContentPart(text=f"Request {index}: what is the weather in {rng.choice(_WORDS)}?")]
        tools = [_WEATHER_TOOL]
    elif kind == "long":
        parts.append(chat_pb2.ContentPart(text=_words(rng, long_words)))
    return chat_pb2.ChatRequest(
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=parts)],
        tools=tools,
        sampling=chat_pb2.SamplingParams(temperature=temperature, max_tokens=max_tokens),
    )


def chooser(mix: dict[str, float], seed: int = 0) -> Callable[[int], str]:
    """The kind of request `index`: drawn from `mix`, the same for the same seed and index."""
    kinds = list(mix)
    weights = [mix[k] for k in kinds]

    def kind_of(index: int) -> str:
        return random.Random(seed * 1_000_003 + index).choices(kinds, weights)[0]

    return kind_of


def openai_messages(request: chat_pb2.ChatRequest) -> list[dict[str, str]]:
    """The same text messages in the OpenAI chat format (for `vllm serve`); images are not carried."""
    roles = {chat_pb2.ROLE_SYSTEM: "system", chat_pb2.ROLE_USER: "user", chat_pb2.ROLE_ASSISTANT: "assistant"}
    return [
        {
            "role": roles[m.role],
            "content": "".join(p.text for p in m.content if p.WhichOneof("kind") == "text"),
        }
        for m in request.messages
    ]


def openai_tools(request: chat_pb2.ChatRequest) -> list[dict[str, object]]:
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": json.loads(t.parameters_json_schema),
            },
        }
        for t in request.tools
    ]
