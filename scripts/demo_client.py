"""Sends one chat with an image and a tool to a running mistral-serve and prints the stream."""

from __future__ import annotations

import asyncio
import io
import json
import sys

from PIL import Image

from mistral_serve.client import ChatClient
from mistral_serve.v1 import chat_pb2


def demo_image() -> bytes:
    image = Image.new("RGB", (224, 160), (30, 120, 200))
    for x in range(60, 160):
        for y in range(40, 120):
            image.putpixel((x, y), (250, 200, 40))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def demo_request(with_image: bool) -> chat_pb2.ChatRequest:
    weather = chat_pb2.Tool(
        name="get_weather",
        description="Current weather of a city",
        parameters_json_schema=json.dumps(
            {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        ),
    )
    user = chat_pb2.Message(
        role=chat_pb2.ROLE_USER,
        content=[chat_pb2.ContentPart(text="What is in this picture? And what is the weather in Paris?")],
    )
    if with_image:
        user.content.append(
            chat_pb2.ContentPart(image=chat_pb2.ImageBytes(data=demo_image(), mime_type="image/png"))
        )
    return chat_pb2.ChatRequest(
        messages=[user], tools=[weather], sampling=chat_pb2.SamplingParams(max_tokens=48)
    )


async def main(target: str) -> None:
    async with ChatClient(target) as client:
        info = await client.model_info()
        print(f"model {info.model}, context {info.context_length}, up to {info.max_images_per_prompt} images")
        if not info.supports_images:
            print("(this model takes no images here: the demo sends its text and tool only)")
        async for event in client.stream(demo_request(info.supports_images), timeout_s=300):
            kind = event.WhichOneof("event")
            if kind == "started":
                print(f"[started {event.started.request_id}]")
            elif kind == "delta":
                for call in event.delta.tool_calls:
                    print(
                        f"[tool call {call.index} {call.name}{call.arguments_fragment}]", end="", flush=True
                    )
                print(event.delta.text, end="", flush=True)
            elif kind == "finished":
                f = event.finished
                reason = chat_pb2.FinishReason.Name(f.finish_reason)
                print(
                    f"\n[finished {reason}; prompt {f.usage.prompt_tokens} "
                    f"tokens ({f.usage.image_tokens} image), completion {f.usage.completion_tokens}; "
                    f"first token {f.timings.time_to_first_token_seconds * 1000:.0f} ms]"
                )
            else:
                print(f"\n[error {event.error.code}: {event.error.message}]")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))
