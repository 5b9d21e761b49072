"""ChatClient: deadlines on every call, a retry that waits at least as long as the service's RetryInfo
says (a little more, at random, so refused callers do not all come back at once), and a request
cancelled in the service as soon as its caller stops reading it or is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, Sequence
from types import TracebackType
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mistral_serve.v1 import chat_pb2, chat_pb2_grpc

# Codes worth retrying before anything was received: the request never ran.
_RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
# Codes of a stream broken under a running request (a frontend lost, a connection reset).
_BROKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# A retry after RetryInfo's delay waits up to this share of it more, at random.
RETRY_JITTER = 0.5
# How long the CancelChat sent for a caller that stopped may take.
_CANCEL_TIMEOUT_S = 5.0


def user_message(text: str) -> chat_pb2.Message:
    return chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])


class ChatClient:
    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_attempts: int = 4,
        max_reattaches: int = 8,
        backoff_s: float = 0.2,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._channel = channel or grpc.aio.insecure_channel(
            target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        )
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._metadata: Sequence[tuple[str, str]] = (
            [("authorization", f"Bearer {api_key}")] if api_key else []
        )
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._max_reattaches = max_reattaches
        self._backoff_s = backoff_s

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def stream(
        self, request: chat_pb2.ChatRequest, *, timeout_s: float | None = None
    ) -> AsyncGenerator[chat_pb2.ChatEvent, None]:
        """The request's events, as one continuous stream.

        Before anything arrived, a refused request is sent again (RetryInfo's delay). After `started`,
        a stream that breaks (UNAVAILABLE, a reset, an end with no terminal event) is picked up again
        by reattaching, on any frontend, after the last delta received: no gap, no duplicate. A caller
        that stops iterating before the end, or whose task is cancelled, cancels the request.
        """
        async with contextlib.aclosing(
            self._follow(chat_pb2.ChatStreamRequest(request=request), timeout_s)
        ) as events:
            async for event in events:
                yield event

    async def reattach(
        self, request_id: str, last_sequence: int = 0, *, timeout_s: float | None = None
    ) -> AsyncGenerator[chat_pb2.ChatEvent, None]:
        """Pick up a request this caller started: `started`, the deltas after `last_sequence`, the end."""
        first = chat_pb2.ChatStreamRequest(
            reattach=chat_pb2.Reattach(request_id=request_id, last_sequence=last_sequence)
        )
        async with contextlib.aclosing(self._follow(first, timeout_s)) as events:
            async for event in events:
                yield event

    async def cancel(self, request_id: str) -> None:
        """End a request this caller started, attached or not; cancelling an ended one is fine too."""
        await self._stub.CancelChat(
            chat_pb2.CancelChatRequest(request_id=request_id),
            timeout=self._timeout_s,
            metadata=self._metadata,
        )

    async def _follow(
        self, first: chat_pb2.ChatStreamRequest, timeout_s: float | None
    ) -> AsyncGenerator[chat_pb2.ChatEvent, None]:
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
        request_id = first.reattach.request_id or None
        ended = False
        try:
            async with contextlib.aclosing(self._events(first, deadline)) as events:
                async for event in events:
                    kind = event.WhichOneof("event")
                    if kind == "started":
                        request_id = event.started.request_id
                    ended = kind in ("finished", "error")
                    yield event
        except (GeneratorExit, asyncio.CancelledError):
            # The caller meant it: end the request now rather than after the service's detach grace.
            if request_id is not None and not ended:
                await self._cancel_quietly(request_id)
            raise

    async def _cancel_quietly(self, request_id: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self.cancel(request_id), _CANCEL_TIMEOUT_S)

    async def _events(
        self, first: chat_pb2.ChatStreamRequest, deadline: float
    ) -> AsyncGenerator[chat_pb2.ChatEvent, None]:
        message = first
        request_id = first.reattach.request_id or None
        last_sequence = first.reattach.last_sequence
        refusals = breaks = 0
        while True:
            call = self._stub.ChatStream(
                message, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata
            )
            try:
                async for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "started":
                        if request_id is not None and message is not first:
                            continue  # a reattach's `started`: the caller has it
                        request_id = event.started.request_id
                    elif kind == "delta":
                        if event.delta.sequence <= last_sequence:
                            continue
                        if event.delta.sequence != last_sequence + 1:
                            # Never passed on: reattach after the last delta received instead.
                            raise _gap(last_sequence, event.delta.sequence)
                        last_sequence = event.delta.sequence
                    yield event
                    if kind in ("finished", "error"):
                        return
                error: grpc.aio.AioRpcError | None = None  # ended with no terminal event
            except grpc.aio.AioRpcError as raised:
                error = raised
            finally:
                call.cancel()
            error = error or _broken_stream()
            if request_id is None:  # nothing started: the request never ran
                refusals += 1
                if not await self._wait_before_retry(error, refusals, deadline):
                    raise error
                continue
            breaks += 1
            if not await self._wait_before_reattach(error, breaks, deadline):
                raise error
            message = chat_pb2.ChatStreamRequest(
                reattach=chat_pb2.Reattach(request_id=request_id, last_sequence=last_sequence)
            )

    async def chat(
        self, request: chat_pb2.ChatRequest, *, timeout_s: float | None = None
    ) -> chat_pb2.ChatResponse:
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
        attempt = 0
        while True:
            attempt += 1
            try:
                response: chat_pb2.ChatResponse = await self._stub.Chat(
                    request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata
                )
                return response
            except grpc.aio.AioRpcError as error:
                if not await self._wait_before_retry(error, attempt, deadline):
                    raise

    async def count_tokens(self, request: chat_pb2.ChatRequest) -> chat_pb2.CountTokensResponse:
        response: chat_pb2.CountTokensResponse = await self._stub.CountTokens(
            chat_pb2.CountTokensRequest(request=request), timeout=self._timeout_s, metadata=self._metadata
        )
        return response

    async def model_info(self) -> chat_pb2.GetModelInfoResponse:
        response: chat_pb2.GetModelInfoResponse = await self._stub.GetModelInfo(
            chat_pb2.GetModelInfoRequest(), timeout=self._timeout_s, metadata=self._metadata
        )
        return response

    async def _wait_before_reattach(self, error: grpc.aio.AioRpcError, breaks: int, deadline: float) -> bool:
        """Sleep before reattaching and return True, or return False when the break is final."""
        if error.code() not in _BROKEN:
            return False
        if breaks > self._max_reattaches:
            return False
        delay = min(self._backoff_s * 2 ** (breaks - 1), 2.0) * (0.5 + random.random())
        if time.monotonic() + delay >= deadline:
            return False
        await asyncio.sleep(delay)
        return True

    async def _wait_before_retry(self, error: grpc.aio.AioRpcError, attempt: int, deadline: float) -> bool:
        """Sleep before the next attempt and return True, or return False when it must not retry."""
        if error.code() not in _RETRYABLE or attempt >= self._max_attempts:
            return False
        asked = retry_delay(error)
        delay = jittered(asked) if asked else self._backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
        if time.monotonic() + delay >= deadline:
            return False
        await asyncio.sleep(delay)
        return True


def _broken_stream() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        "the stream ended with no terminal event",
    )


def _gap(last: int, got: int) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        f"delta {got} came after delta {last}: a gap",
    )


def jittered(asked_s: float) -> float:
    """RetryInfo's delay plus up to RETRY_JITTER of it, at random: never earlier than asked."""
    return asked_s * (1.0 + RETRY_JITTER * random.random())


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The delay a RetryInfo detail of `error` asks for, in seconds, if it has one."""
    status = rpc_status.from_call(_TrailersOf(error))
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


class _TrailersOf:
    """Adapts an aio error to the call shape `rpc_status.from_call` reads."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        self._error = error

    def code(self) -> grpc.StatusCode:
        return self._error.code()

    def details(self) -> str | None:
        return self._error.details()

    def trailing_metadata(self) -> Any:
        return self._error.trailing_metadata()
