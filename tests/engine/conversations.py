"""Conversations the fidelity tests run both ways: as our `ChatRequest` and as vLLM's OpenAI-style chat."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mistral_serve.v1 import chat_pb2 as pb

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"],
}


def make_png(width: int = 84, height: int = 56) -> bytes:
    """A small deterministic RGB image: 84x56 px is 3x2 image tokens at 28 px per merged patch."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [((x * 3) % 256, (y * 5) % 256, (x * y) % 256) for y in range(height) for x in range(width)]
    )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime_type: str = "image/png") -> str:
    return f"data:{mime_type};base64," + base64.b64encode(data).decode()


def with_images_as(messages: list[dict[str, Any]], load: Callable[[Image.Image], Image.Image]) -> list[Any]:
    """`messages` with each data: URL image as `load` turns the opened image, re-encoded as PNG."""
    out: list[Any] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image_url":
                    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                    buf = io.BytesIO()
                    load(Image.open(io.BytesIO(data))).save(buf, format="PNG")
                    part = {"type": "image_url", "image_url": {"url": data_url(buf.getvalue())}}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


def text(s: str) -> pb.ContentPart:
    return pb.ContentPart(text=s)


@dataclass
class Conversation:
    name: str
    chat: pb.ChatRequest
    openai_messages: list[dict[str, Any]]
    openai_tools: list[dict[str, Any]] | None = None
    continue_final_message: bool = False
    needs_vision: bool = False
    max_tokens: int = 24
    extra: dict[str, Any] = field(default_factory=dict)


def make_sideways_jpeg(width: int = 112, height: int = 28) -> bytes:
    """A JPEG stored `width` x `height` whose EXIF orientation (6: rotate 90 degrees) shows it
    `height` x `width`: 4x1 image tokens as stored, 1x4 as shown."""
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7) % 256, (y * 11) % 256, 128) for y in range(height) for x in range(width)])
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _sampling(max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, max_tokens=max_tokens)


def text_conversation() -> Conversation:
    chat = pb.ChatRequest(
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content=[text("You answer in one short sentence.")]),
            pb.Message(role=pb.ROLE_USER, content=[text("What is the capital of France?")]),
            pb.Message(role=pb.ROLE_ASSISTANT, content=[text("Paris.")]),
            pb.Message(role=pb.ROLE_USER, content=[text("And of Italy? Ünïcödé, 日本語 ✓")]),
        ],
        sampling=_sampling(24),
    )
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? Ünïcödé, 日本語 ✓"},
    ]
    return Conversation("text", chat, messages)


def tool_conversation() -> Conversation:
    args = json.dumps({"city": "Paris"})
    chat = pb.ChatRequest(
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content=[text("Use tools when they help.")]),
            pb.Message(role=pb.ROLE_USER, content=[text("Weather in Paris?")]),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.FunctionCall(id="aB3dE5gH9", name="get_weather", arguments_json=args)],
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="aB3dE5gH9", content=[text('{"temp_c": 21}')]),
            pb.Message(role=pb.ROLE_USER, content=[text("And in Rome?")]),
        ],
        tools=[
            pb.Tool(
                name="get_weather",
                description="Current weather in a city.",
                parameters_json_schema=json.dumps(WEATHER_SCHEMA),
            )
        ],
        sampling=_sampling(24),
    )
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Use tools when they help."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "aB3dE5gH9",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": args},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "aB3dE5gH9", "content": '{"temp_c": 21}'},
        {"role": "user", "content": "And in Rome?"},
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city.",
                "parameters": WEATHER_SCHEMA,
            },
        }
    ]
    return Conversation("tools", chat, messages, openai_tools=tools)


def prefix_conversation() -> Conversation:
    chat = pb.ChatRequest(
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content=[text("Be terse.")]),
            pb.Message(role=pb.ROLE_USER, content=[text("Count to five.")]),
            pb.Message(role=pb.ROLE_ASSISTANT, content=[text("One, two,")], prefix=True),
        ],
        sampling=_sampling(16),
    )
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Count to five."},
        {"role": "assistant", "content": "One, two,"},
    ]
    return Conversation("prefix", chat, messages, continue_final_message=True, max_tokens=16)


def image_conversation() -> Conversation:
    png = make_png()
    url = data_url(png)
    # The caller's data: URL reaches the worker as the bytes it holds (the front door's one form).
    image = pb.ContentPart(image=pb.ImageBytes(data=png, mime_type="image/png"))
    chat = pb.ChatRequest(
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content=[text("Describe images.")]),
            pb.Message(role=pb.ROLE_USER, content=[text("What is in this picture?"), image]),
        ],
        sampling=_sampling(16),
    )
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Describe images."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        },
    ]
    return Conversation("image", chat, messages, needs_vision=True, max_tokens=16)


def two_images_conversation() -> Conversation:
    """Two images of different shapes in one turn: 84x56 px is 8 image tokens, 56x84 px is 9.

    A system message of its own, as a caller would send."""
    wide, tall = make_png(84, 56), make_png(56, 84)
    chat = pb.ChatRequest(
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content=[text("Describe images.")]),
            pb.Message(
                role=pb.ROLE_USER,
                content=[
                    text("Compare"),
                    pb.ContentPart(image=pb.ImageBytes(data=wide, mime_type="image/png")),
                    text("with"),
                    pb.ContentPart(image=pb.ImageBytes(data=tall, mime_type="image/png")),
                ],
            ),
        ],
        sampling=_sampling(16),
    )
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Describe images."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image_url", "image_url": {"url": data_url(wide)}},
                {"type": "text", "text": "with"},
                {"type": "image_url", "image_url": {"url": data_url(tall)}},
            ],
        },
    ]
    return Conversation("two_images", chat, messages, needs_vision=True, max_tokens=16)


def _parts(*texts: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": t} for t in texts]


def multipart_conversation() -> Conversation:
    """SYSTEM, ASSISTANT and TOOL messages of several text parts each (joined with a blank line)."""
    args = json.dumps({"city": "Paris"})
    chat = pb.ChatRequest(
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content=[text("Rule one."), text("Rule two.")]),
            pb.Message(role=pb.ROLE_USER, content=[text("Weather in Paris?")]),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.FunctionCall(id="aB3dE5gH9", name="get_weather", arguments_json=args)],
            ),
            pb.Message(
                role=pb.ROLE_TOOL, tool_call_id="aB3dE5gH9", content=[text("sunny"), text('{"temp_c": 21}')]
            ),
            pb.Message(role=pb.ROLE_ASSISTANT, content=[text("It is sunny,"), text("21 degrees.")]),
            pb.Message(role=pb.ROLE_USER, content=[text("Thanks!")]),
        ],
        tools=[pb.Tool(name="get_weather", parameters_json_schema=json.dumps(WEATHER_SCHEMA))],
        sampling=_sampling(8),
    )
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": _parts("Rule one.", "Rule two.")},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "aB3dE5gH9",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": args},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "aB3dE5gH9", "content": _parts("sunny", '{"temp_c": 21}')},
        {"role": "assistant", "content": _parts("It is sunny,", "21 degrees.")},
        {"role": "user", "content": "Thanks!"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
    return Conversation("multipart", chat, messages, openai_tools=tools, max_tokens=8)


def no_system_conversation() -> Conversation:
    """No SYSTEM message: vLLM adds none, so neither may we once the default is switched off."""
    chat = pb.ChatRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content=[text("Say hello.")])], sampling=_sampling(8)
    )
    return Conversation("no-system", chat, [{"role": "user", "content": "Say hello."}], max_tokens=8)


def exif_jpeg_conversation() -> Conversation:
    jpeg = make_sideways_jpeg()
    url = data_url(jpeg, "image/jpeg")
    image = pb.ContentPart(image=pb.ImageBytes(data=jpeg, mime_type="image/jpeg"))
    chat = pb.ChatRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content=[text("Which way is up?"), image])],
        sampling=_sampling(8),
    )
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Which way is up?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    return Conversation("exif-jpeg", chat, messages, needs_vision=True, max_tokens=8)


def all_conversations() -> list[Conversation]:
    """Each as a caller moving from `vllm serve` sends it: with the default system prompt off."""
    conversations = [
        text_conversation(),
        tool_conversation(),
        prefix_conversation(),
        image_conversation(),
        two_images_conversation(),
        multipart_conversation(),
        no_system_conversation(),
        exif_jpeg_conversation(),
    ]
    for c in conversations:
        c.chat.default_system_prompt = False
    return conversations
