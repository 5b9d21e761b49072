"""ChatStream at the raw gRPC stub, for tests that must see every event the frontend sends: ChatClient
drops a delta it already has (a resent sequence), so a test through it cannot catch a frontend that
resends one."""

from __future__ import annotations

import grpc

from mistral_serve.v1 import chat_pb2, chat_pb2_grpc


def reattach(request_id: str, last_sequence: int = 0) -> chat_pb2.ChatStreamRequest:
    return chat_pb2.ChatStreamRequest(
        reattach=chat_pb2.Reattach(request_id=request_id, last_sequence=last_sequence)
    )


def start(request: chat_pb2.ChatRequest) -> chat_pb2.ChatStreamRequest:
    return chat_pb2.ChatStreamRequest(request=request)


async def raw_events(
    port: int, message: chat_pb2.ChatStreamRequest, *, timeout_s: float = 30.0
) -> list[chat_pb2.ChatEvent]:
    """Every event of one ChatStream on 127.0.0.1:`port`, as sent."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        return [event async for event in stub.ChatStream(message, timeout=timeout_s)]


async def follow(
    port: int, message: chat_pb2.ChatStreamRequest, sink: list[chat_pb2.ChatEvent], *, timeout_s: float = 60.0
) -> None:
    """Like `raw_events`, appending each event to `sink` as it arrives, for tests that act mid-stream."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        async for event in stub.ChatStream(message, timeout=timeout_s):
            sink.append(event)
