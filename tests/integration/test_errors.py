"""Bad input over gRPC: INVALID_ARGUMENT with a BadRequest naming the field; other requests unharmed."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mistral_serve.client import ChatClient
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import free_port
from tests.integration.conftest import Stack
from tests.support.requests import chat, events_text


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_invalid_stream_request_names_the_field_and_others_complete(stack: Stack) -> None:
    frontend = await stack.frontend()
    await stack.worker()
    good = stack.client(frontend)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        bad = chat_pb2.ChatStreamRequest(
            request=chat_pb2.ChatRequest(
                messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart()])]
            )
        )

        async def send_bad() -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.ChatStream(bad, timeout=5):
                    pass
            return refused.value

        error, events = await asyncio.gather(send_bad(), _collect(good, "still fine"))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["request.messages[0].content[0]"]
    assert events_text(events).startswith("still fine")


async def test_invalid_unary_request_names_the_field(stack: Stack) -> None:
    frontend = await stack.frontend()
    client = stack.client(frontend)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.chat(chat_pb2.ChatRequest())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["messages"]


async def test_count_tokens_without_tokenizer_is_failed_precondition(stack: Stack) -> None:
    frontend = await stack.frontend()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.client(frontend).count_tokens(chat())
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_redis_down_answers_unavailable(stack: Stack) -> None:
    stack.redis_url = f"redis://127.0.0.1:{free_port()}/0"
    frontend = await stack.frontend()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.client(frontend, max_attempts=1).chat(chat(), timeout_s=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def _collect(client: ChatClient, prompt: str) -> list[chat_pb2.ChatEvent]:
    return [e async for e in client.stream(chat(prompt))]
