"""ChatService: the gRPC door. Protobuf in, one call into the request pipeline, its events out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeAlias

import grpc

from mistral_serve.v1 import chat_pb2, chat_pb2_grpc

from .auth import current_caller
from .errors import InvalidRequest, RequestFailed, grpc_code, stream_errors, unary_errors
from .pipeline import ChatPipeline

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, pipeline: ChatPipeline) -> None:
        self._pipeline = pipeline

    @stream_errors
    async def ChatStream(
        self, request: chat_pb2.ChatStreamRequest, context: Context
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        caller = current_caller()
        deadline = self._pipeline.deadline(context.time_remaining())
        if request.WhichOneof("kind") == "reattach":
            reattach = request.reattach
            with fields_under("reattach."):
                events = await self._pipeline.reattach(
                    reattach.request_id, reattach.last_sequence, caller=caller.identity, deadline=deadline
                )
        else:
            with fields_under("request."):
                events = await self._pipeline.chat(request.request, caller=caller, deadline=deadline)
        with contextlib.closing(events):
            async for event in events:
                yield event

    @unary_errors
    async def CancelChat(
        self, request: chat_pb2.CancelChatRequest, context: Context
    ) -> chat_pb2.CancelChatResponse:
        await self._pipeline.cancel(request.request_id, caller=current_caller().identity)
        return chat_pb2.CancelChatResponse()

    @unary_errors
    async def Chat(self, request: chat_pb2.ChatRequest, context: Context) -> chat_pb2.ChatResponse:
        deadline = self._pipeline.deadline(context.time_remaining())
        events = await self._pipeline.chat(request, caller=current_caller(), deadline=deadline)
        response = chat_pb2.ChatResponse()
        text: list[str] = []
        with contextlib.closing(events):
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "started":
                    response.request_id = event.started.request_id
                elif kind == "delta":
                    text.append(event.delta.text)
                elif kind == "finished":
                    response.finished.CopyFrom(event.finished)
                elif kind == "error":
                    raise RequestFailed(grpc_code(event.error.code), event.error.message)
        response.text = "".join(text)
        return response

    @unary_errors
    async def CountTokens(
        self, request: chat_pb2.CountTokensRequest, context: Context
    ) -> chat_pb2.CountTokensResponse:
        with fields_under("request."):
            return await self._pipeline.count_tokens(request.request)

    @unary_errors
    async def GetModelInfo(
        self, request: chat_pb2.GetModelInfoRequest, context: Context
    ) -> chat_pb2.GetModelInfoResponse:
        return self._pipeline.model_info()


@contextlib.contextmanager
def fields_under(prefix: str) -> Iterator[None]:
    """Name the pipeline's field paths where this RPC's message holds the request."""
    try:
        yield
    except InvalidRequest as error:
        raise error.under(prefix) from error
