"""Request builders shared by tests."""

from __future__ import annotations

from mistral_serve.client import user_message
from mistral_serve.v1 import chat_pb2


def chat(text: str = "hello there", *, max_tokens: int | None = None) -> chat_pb2.ChatRequest:
    request = chat_pb2.ChatRequest(messages=[user_message(text)])
    if max_tokens is not None:
        request.sampling.max_tokens = max_tokens
    return request


def events_text(events: list[chat_pb2.ChatEvent]) -> str:
    return "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
