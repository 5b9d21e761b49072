"""ChatClient: deadlines on every call, and a retry that waits as long as the service's RetryInfo says."""

from __future__ import annotations

import asyncio
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
        """The request's events. Retried while refused before any event arrived, never after."""
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
        attempt = 0
        while True:
            attempt += 1
            call = self._stub.ChatStream(
                chat_pb2.ChatStreamRequest(request=request),
                timeout=max(deadline - time.monotonic(), 0.0),
                metadata=self._metadata,
            )
            received = False
            try:
                async for event in call:
                    received = True
                    yield event
                return
            except grpc.aio.AioRpcError as error:
                if received or not await self._wait_before_retry(error, attempt, deadline):
                    raise
            finally:
                call.cancel()

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

    async def _wait_before_retry(self, error: grpc.aio.AioRpcError, attempt: int, deadline: float) -> bool:
        """Sleep before the next attempt and return True, or return False when it must not retry."""
        if error.code() not in _RETRYABLE or attempt >= self._max_attempts:
            return False
        delay = retry_delay(error) or self._backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
        if time.monotonic() + delay >= deadline:
            return False
        await asyncio.sleep(delay)
        return True


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
