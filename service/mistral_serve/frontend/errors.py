"""Errors a handler can raise, and the one place that turns them into gRPC statuses."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FieldViolation:
    # Path of the offending field, e.g. "messages[2].content[1].image".
    field: str
    description: str


class ServiceError(Exception):
    """An error a caller gets as a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def details(self) -> list[Any]:
        return []


class InvalidRequest(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))

    def under(self, prefix: str) -> InvalidRequest:
        """The same violations with their paths under `prefix` (where a door's message holds them)."""
        return InvalidRequest([FieldViolation(f"{prefix}{v.field}", v.description) for v in self.violations])

    def details(self) -> list[Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        return [bad]


class Unauthenticated(ServiceError):
    """No credentials, or credentials the service does not know: the caller is nobody yet."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """The caller is known, but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class QueueFull(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, backlog_bound: int, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"the queue holds its bound of {backlog_bound} requests; retry later")

    def details(self) -> list[Any]:
        return [_retry_info(self.retry_after_s)]


def _retry_info(delay_s: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(int(delay_s * 1000))
    return error_details_pb2.RetryInfo(retry_delay=delay)


class QuotaExceeded(ServiceError):
    """A caller reached one of its quota's limits (`common/quota.py`); `retry_after_s` until it lets
    this request in (for requests in flight: a guess, as when a request ends is not known)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, caller: str, limit: str, retry_after_s: float) -> None:
        self.caller = caller
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.description = f"the caller's {limit} quota is used up"
        super().__init__(f"{self.description}; retry in {retry_after_s:.3f}s")

    def details(self) -> list[Any]:
        failure = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=self.caller, description=self.description)
            ]
        )
        return [failure, _retry_info(self.retry_after_s)]


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class BackendUnavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class NotConfigured(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class RequestFailed(ServiceError):
    """A terminal `error` event of an admitted request, surfaced as a status by the unary RPC."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(message)


def to_status(error: ServiceError) -> grpc.Status:
    detail_msgs = []
    for detail in error.details():
        packed = status_pb2.Status().details.add()
        packed.Pack(detail)
        detail_msgs.append(packed)
    status = status_pb2.Status(code=error.code.value[0], message=str(error), details=detail_msgs)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def grpc_code(code: int) -> grpc.StatusCode:
    """The StatusCode of a google.rpc.Code number (UNKNOWN for numbers gRPC does not know)."""
    for status_code in grpc.StatusCode:
        if status_code.value[0] == code:
            return status_code
    return grpc.StatusCode.UNKNOWN


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> NoReturn:
    """End the RPC with the status of `error` (INTERNAL for anything that is not a ServiceError)."""
    if not isinstance(error, ServiceError):
        log.exception("unexpected error in handler", exc_info=error)
        error = ServiceError("internal error")
    await context.abort_with_status(to_status(error))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


def unary_errors(
    handler: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(handler)
    async def wrapper(self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await handler(self, request, context)
        except ServiceError as error:
            await abort(context, error)
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await abort(context, error)

    return wrapper


def stream_errors(
    handler: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    @functools.wraps(handler)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> AsyncIterator[Resp]:
        try:
            async for item in handler(self, request, context):
                yield item
        except ServiceError as error:
            await abort(context, error)
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await abort(context, error)

    return wrapper
