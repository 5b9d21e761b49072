"""ChatService: protobuf in, one queued request, its events out."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

import grpc
from google.rpc import code_pb2

from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc

from .errors import NotConfigured, RequestFailed, grpc_code, stream_errors, unary_errors
from .fanout import EventFanout
from .queue import RequestQueue
from .settings import FrontendSettings
from .validation import apply_defaults, validate_chat_request

log = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
# Counts a request's prompt tokens (text and images) the way the worker's prompt builder does.
TokenCounter: TypeAlias = Callable[[chat_pb2.ChatRequest], chat_pb2.CountTokensResponse]


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(
        self,
        settings: FrontendSettings,
        queue: RequestQueue,
        fanout: EventFanout,
        token_counter: TokenCounter | None,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._fanout = fanout
        self._token_counter = token_counter
        # Cancels run after their RPC is gone; hold them so they are not garbage collected.
        self._cancels: set[asyncio.Task[None]] = set()

    @stream_errors
    async def ChatStream(
        self, request: chat_pb2.ChatStreamRequest, context: Context
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        validate_chat_request(request.request, path="request.")
        async for event in self._run(request.request, context):
            yield event

    @unary_errors
    async def Chat(self, request: chat_pb2.ChatRequest, context: Context) -> chat_pb2.ChatResponse:
        validate_chat_request(request)
        response = chat_pb2.ChatResponse()
        text: list[str] = []
        async for event in self._run(request, context):
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
        validate_chat_request(request.request, path="request.")
        if self._token_counter is None:
            raise NotConfigured("CountTokens needs MISTRAL_SERVE_TOKENIZER (the model's tekken.json)")
        return self._token_counter(request.request)

    @unary_errors
    async def GetModelInfo(
        self, request: chat_pb2.GetModelInfoRequest, context: Context
    ) -> chat_pb2.GetModelInfoResponse:
        s = self._settings
        return chat_pb2.GetModelInfoResponse(
            model=s.model_name,
            context_length=s.context_length,
            max_images_per_prompt=s.max_images_per_prompt,
            supports_tools=True,
            supports_images=s.max_images_per_prompt > 0,
        )

    async def _run(
        self, request: chat_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Queue `request` and yield its events: started, deltas in order, one terminal event."""
        request_id = uuid.uuid4().hex
        now = time.time()
        remaining = context.time_remaining()
        deadline = now + (self._settings.default_deadline_s if remaining is None else remaining)
        queued = queue_pb2.QueuedRequest(
            request_id=request_id,
            request=apply_defaults(request),
            deadline_unix=deadline,
            admitted_unix=now,
            attempt=1,
        )
        sub = self._fanout.open(request_id)
        admitted = ended = False
        try:
            await self._queue.admit(queued)
            admitted = True
            yield chat_pb2.ChatEvent(started=chat_pb2.Started(request_id=request_id))
            last_sequence = 0
            while not ended:
                try:
                    batch = await asyncio.wait_for(sub.batches.get(), timeout=max(deadline - time.time(), 0))
                except TimeoutError:
                    ended = True
                    self._cancel_later(request_id)
                    yield _error(code_pb2.DEADLINE_EXCEEDED, "the request's deadline passed", retryable=True)
                    break
                for event in batch:
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        # A resumed or replayed stream may repeat what this caller already has.
                        if event.delta.sequence <= last_sequence:
                            continue
                        last_sequence = event.delta.sequence
                    yield event
                    if kind in ("finished", "error"):
                        ended = True
                        break
        finally:
            self._fanout.close(request_id)
            if admitted and not ended:
                self._cancel_later(request_id)

    def _cancel_later(self, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel(request_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, request_id: str) -> None:
        try:
            await self._queue.cancel(request_id)
        except Exception:
            log.warning("could not mark request %s cancelled", request_id, exc_info=True)


def _error(code: int, message: str, *, retryable: bool) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(error=chat_pb2.Error(code=code, message=message, retryable=retryable))
