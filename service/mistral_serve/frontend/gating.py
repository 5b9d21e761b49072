"""Run a check before a gRPC method's handler, as an interceptor does, with the servicer context at hand.

`grpc.aio` interceptors see only the method name and metadata; a check that needs the peer's TLS
identity or the decoded request wraps the handler instead, and ends the RPC with the status that
`errors.abort` gives the ServiceError it raised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from .errors import ServiceError, abort

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
# Raises a ServiceError to refuse the call; the request is None for client-streaming methods.
Gate: TypeAlias = Callable[[Any, Context], Awaitable[None]]


def gated(
    handler: grpc.RpcMethodHandler[Any, Any],
    gate: Gate,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with `gate` run before it (and, optionally, another request deserializer)."""
    deserializer = request_deserializer or handler.request_deserializer
    serializer = handler.response_serializer
    h: Any = handler  # the stubs type the behaviours as sync callables; under grpc.aio they are async

    async def check(request: Any, context: Context) -> None:
        try:
            await gate(request, context)
        except ServiceError as error:
            await abort(context, error)

    if h.unary_unary is not None:
        unary_unary = h.unary_unary

        async def uu(request: Any, context: Context) -> Any:
            await check(request, context)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(uu, deserializer, serializer)
    if h.unary_stream is not None:
        unary_stream = h.unary_stream

        async def us(request: Any, context: Context) -> AsyncIterator[Any]:
            await check(request, context)
            async for item in unary_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(us, deserializer, serializer)
    if h.stream_unary is not None:
        stream_unary = h.stream_unary

        async def su(requests: Any, context: Context) -> Any:
            await check(None, context)
            return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(su, deserializer, serializer)
    stream_stream = h.stream_stream

    async def ss(requests: Any, context: Context) -> AsyncIterator[Any]:
        await check(None, context)
        async for item in stream_stream(requests, context):
            yield item

    return grpc.stream_stream_rpc_method_handler(ss, deserializer, serializer)
