"""Requests whose bytes are not the message they claim to be are the caller's fault: INVALID_ARGUMENT.

By default grpc answers UNKNOWN when a request cannot be parsed (bad UTF-8 in a string field, a
corrupt wire format). This interceptor gives the service's methods a deserializer that never raises
and refuses such a request with a BadRequest whose field is "" (the whole message).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from .errors import FieldViolation, InvalidRequest
from .gating import Context, gated


@dataclass(frozen=True, slots=True)
class Undecodable:
    reason: str


def lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf raises DecodeError, and a few others on hostile input
            return Undecodable(str(exc) or type(exc).__name__)

    return deserialize


class DecodeGuard(grpc.aio.ServerInterceptor):
    def __init__(self, service_prefixes: tuple[str, ...]) -> None:
        self._prefixes = service_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if not handler_call_details.method.startswith(self._prefixes):
            return handler

        async def gate(request: Any, context: Context) -> None:
            if isinstance(request, Undecodable):
                raise InvalidRequest([FieldViolation("", f"the request cannot be parsed: {request.reason}")])

        return gated(handler, gate, request_deserializer=lenient(handler.request_deserializer))
