"""ChatService: protobuf in, one queued request, its events out."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

import grpc
from google.rpc import code_pb2

from mistral_serve.common.contract import error_event
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc

from .auth import current_caller
from .errors import (
    FieldViolation,
    InvalidRequest,
    NotConfigured,
    NotFound,
    RequestFailed,
    grpc_code,
    stream_errors,
    unary_errors,
)
from .fanout import EventFanout, Subscription
from .idempotency import Idempotency, fingerprint
from .image_urls import ImageFetcher, resolve_image_urls
from .queue import RequestQueue
from .request_form import FrontDoorRequest, build_request_form
from .settings import FrontendSettings
from .validation import Limits, check_budget, validate_chat_request

log = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
# Counts a request's prompt tokens (text and images) the way the worker's prompt builder does.
TokenCounter: TypeAlias = Callable[[FrontDoorRequest], chat_pb2.CountTokensResponse]


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(
        self,
        settings: FrontendSettings,
        queue: RequestQueue,
        fanout: EventFanout,
        token_counter: TokenCounter | None,
        *,
        fetcher: ImageFetcher | None = None,
        idempotency: Idempotency | None = None,
    ) -> None:
        self._settings = settings
        self._limits = Limits.from_settings(settings)
        self._queue = queue
        self._fanout = fanout
        self._token_counter = token_counter
        self._fetcher = fetcher
        self._idempotency = idempotency
        # Cancels run after their RPC is gone; hold them so they are not garbage collected.
        self._cancels: set[asyncio.Task[None]] = set()

    @stream_errors
    async def ChatStream(
        self, request: chat_pb2.ChatStreamRequest, context: Context
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        if request.WhichOneof("kind") == "reattach":
            async for event in self._reattach(request.reattach, context):
                yield event
            return
        admitted = await self._front_door(request.request, path="request.")
        async for event in self._run(request.request, admitted, context, path="request."):
            yield event

    @unary_errors
    async def CancelChat(
        self, request: chat_pb2.CancelChatRequest, context: Context
    ) -> chat_pb2.CancelChatResponse:
        await self._check_owner(request.request_id)
        await self._queue.cancel(request.request_id)
        return chat_pb2.CancelChatResponse()

    @unary_errors
    async def Chat(self, request: chat_pb2.ChatRequest, context: Context) -> chat_pb2.ChatResponse:
        admitted = await self._front_door(request, path="")
        response = chat_pb2.ChatResponse()
        text: list[str] = []
        async for event in self._run(request, admitted, context, path=""):
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
        if self._token_counter is None:
            validate_chat_request(request.request, path="request.", limits=self._limits)
            raise NotConfigured("CountTokens needs MISTRAL_SERVE_TOKENIZER (the model's tekken.json)")
        form = await self._request_form(request.request, path="request.")
        return await asyncio.to_thread(self._token_counter, form)

    @unary_errors
    async def GetModelInfo(
        self, request: chat_pb2.GetModelInfoRequest, context: Context
    ) -> chat_pb2.GetModelInfoResponse:
        s = self._settings
        return chat_pb2.GetModelInfoResponse(
            model=s.served_model_name,
            context_length=s.context_length,
            max_images_per_prompt=s.max_images_per_prompt,
            supports_tools=True,
            supports_images=s.max_images_per_prompt > 0,
        )

    async def _front_door(self, request: chat_pb2.ChatRequest, *, path: str) -> FrontDoorRequest:
        """Every check before a request may cost queue space: the request as it will be queued."""
        form = await self._request_form(request, path=path)
        if self._token_counter is not None:
            counted = await asyncio.to_thread(self._token_counter, form)
            check_budget(counted, form.request, self._limits, path=path)
        return form

    async def _request_form(self, request: chat_pb2.ChatRequest, *, path: str) -> FrontDoorRequest:
        """Validate `request`, fetch its image URLs, and build the one form the rest works on."""
        images = validate_chat_request(request, path=path, limits=self._limits)
        if self._fetcher is not None:
            images |= await resolve_image_urls(request, self._fetcher, path=path)
        return build_request_form(
            request, images, path=path, max_total_image_bytes=self._settings.max_receive_message_bytes
        )

    async def _run(
        self, original: chat_pb2.ChatRequest, form: FrontDoorRequest, context: Context, *, path: str
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Queue `form` and yield its events: started, deltas in order, one terminal event.

        `original` is what the caller sent: a repeat of its client_request_id replays this run.
        """
        request_id = uuid.uuid4().hex
        now = time.time()
        remaining = context.time_remaining()
        deadline = now + (self._settings.default_deadline_s if remaining is None else remaining)
        claim = None
        if self._idempotency is not None and original.client_request_id:
            claim = (current_caller().identity, original.client_request_id, fingerprint(original), request_id)
            first_id = await self._idempotency.claim(*claim, path=path)
            if first_id is not None:
                async for event in self._attach(first_id, deadline, last_sequence=0):
                    yield event
                return
        queued = form.queued
        queued.request_id = request_id
        queued.deadline_unix = deadline
        queued.admitted_unix = now
        queued.attempt = 1
        sub = self._fanout.open(request_id)
        try:
            try:
                await self._queue.admit(queued, owner=current_caller().identity)
            except BaseException:
                if claim is not None and self._idempotency is not None:
                    await self._idempotency.release(*claim)
                raise
            yield chat_pb2.ChatEvent(started=chat_pb2.Started(request_id=request_id))
            # A caller who goes away leaves the request running for the detach grace (they may
            # reattach); the attached key then lapses and a worker cancels it.
            async for event in self._follow(sub, deadline, last_sequence=0):
                yield event
        finally:
            self._fanout.close(sub)

    async def _reattach(
        self, reattach: chat_pb2.Reattach, context: Context
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """The rest of a request this caller started: what it missed from Redis, then live."""
        request_id = reattach.request_id
        await self._check_owner(request_id)
        remaining = context.time_remaining()
        deadline = time.time() + (self._settings.default_deadline_s if remaining is None else remaining)
        async for event in self._attach(request_id, deadline, last_sequence=reattach.last_sequence):
            yield event

    async def _attach(
        self, request_id: str, deadline: float, *, last_sequence: int
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """`started`, then the request's events after `last_sequence`: from Redis, then live."""
        history = await self._fanout.history(request_id)
        if last_sequence > history.last_sequence:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "reattach.last_sequence",
                        f"{last_sequence} is beyond the {history.last_sequence} deltas this request "
                        "has sent; pass the sequence of the last delta you received",
                    )
                ]
            )
        sub = self._fanout.open(request_id, after_entry_id=history.last_entry_id)
        # Before any await: live batches the reader delivers from now on must queue behind the history.
        sub.batches.put_nowait(history.events)
        try:
            await self._fanout.attach_now(request_id)
            yield chat_pb2.ChatEvent(started=chat_pb2.Started(request_id=request_id))
            async for event in self._follow(sub, deadline, last_sequence=last_sequence, owns_deadline=False):
                yield event
        finally:
            self._fanout.close(sub)

    async def _check_owner(self, request_id: str) -> None:
        """Raise NotFound unless the caller started `request_id`: others learn nothing, not even that
        it exists."""
        owner = await self._queue.owner(request_id) if request_id else None
        if owner is None or not hmac.compare_digest(owner.encode(), current_caller().identity.encode()):
            raise NotFound(f"no request {request_id!r} of yours is kept here")

    async def _follow(
        self, sub: Subscription, deadline: float, *, last_sequence: int, owns_deadline: bool = True
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """A subscription's events after `last_sequence` until the terminal one or the deadline.

        `owns_deadline`: the deadline is the request's own, so passing it cancels the request; a
        reattached caller's deadline only ends its stream (detach).
        """
        while True:
            try:
                batch = await asyncio.wait_for(sub.batches.get(), timeout=max(deadline - time.time(), 0))
            except TimeoutError:
                if owns_deadline:
                    self._cancel_later(sub.request_id)
                yield error_event(code_pb2.DEADLINE_EXCEEDED, "the request's deadline passed", retryable=True)
                return
            for event in batch:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    # A resumed or replayed stream may repeat what this caller already has.
                    if event.delta.sequence <= last_sequence:
                        continue
                    last_sequence = event.delta.sequence
                yield event
                if kind in ("finished", "error"):
                    return

    def _cancel_later(self, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel(request_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, request_id: str) -> None:
        try:
            await self._queue.cancel(request_id)
        except Exception:
            log.warning("could not mark request %s cancelled", request_id, exc_info=True)
