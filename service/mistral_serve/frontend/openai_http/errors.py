"""The one place that turns the service's errors into OpenAI's error shape and HTTP statuses.

`{"error": {"message", "type", "param", "code"}}`, `param` in OpenAI's naming. Refusals a retry
cannot help carry `x-should-retry: false` (the openai client then does not retry); a full queue
carries `Retry-After` and `retry-after-ms`, which the openai client waits for before its retry; so
does a caller over its quota, whose `code` names the limit (`requests_per_second`,
`tokens_per_minute`, `requests_in_flight`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import code_pb2

from mistral_serve.v1 import chat_pb2

from ..errors import InvalidRequest, QueueFull, QuotaExceeded, ServiceError
from .requests import OpenAINames

log = logging.getLogger(__name__)


class ModelNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class BodyTooLarge(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


# gRPC / google.rpc code → (HTTP status, OpenAI error type, whether a retry may help).
_BY_CODE: dict[int, tuple[int, str, bool]] = {
    code_pb2.INVALID_ARGUMENT: (400, "invalid_request_error", False),
    code_pb2.OUT_OF_RANGE: (400, "invalid_request_error", False),
    code_pb2.FAILED_PRECONDITION: (400, "invalid_request_error", False),
    code_pb2.UNAUTHENTICATED: (401, "authentication_error", False),
    code_pb2.PERMISSION_DENIED: (403, "permission_error", False),
    code_pb2.NOT_FOUND: (404, "not_found_error", False),
    code_pb2.RESOURCE_EXHAUSTED: (429, "rate_limit_error", True),
    code_pb2.CANCELLED: (499, "cancelled", False),
    code_pb2.UNAVAILABLE: (503, "service_unavailable", True),
    code_pb2.DEADLINE_EXCEEDED: (504, "timeout", True),
    code_pb2.ABORTED: (409, "conflict", True),
}
_INTERNAL = (500, "server_error", True)


def error_body(
    message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_service_error(error: ServiceError, names: OpenAINames | None = None) -> HttpError:
    """The HTTP answer to a request refused before any event was sent."""
    number = error.code.value[0]
    status, kind, retryable = _BY_CODE.get(number, _INTERNAL)
    param = code = None
    message = str(error)
    if isinstance(error, InvalidRequest):
        named = [(_name(v.field, names), v.description) for v in error.violations]
        param = named[0][0]
        message = "; ".join(f"{p}: {d}" if p else d for p, d in named)
    if isinstance(error, ModelNotFound):
        param, code = "model", "model_not_found"
    elif isinstance(error, BodyTooLarge):
        status, code, retryable = 413, "request_too_large", False
    elif status == 401:
        code = "invalid_api_key"
    headers = {} if retryable else {"x-should-retry": "false"}
    if isinstance(error, QueueFull | QuotaExceeded):
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after_s)))
        headers["retry-after-ms"] = str(int(error.retry_after_s * 1000))
        code = error.limit if isinstance(error, QuotaExceeded) else "queue_full"
    return HttpError(status, error_body(message, kind, param=param, code=code), headers)


def from_error_event(error: chat_pb2.Error) -> HttpError:
    """The HTTP answer to a request that ended in an `error` event before its answer was sent."""
    status, kind, _ = _BY_CODE.get(error.code, _INTERNAL)
    headers = {} if error.retryable else {"x-should-retry": "false"}
    return HttpError(status, error_body(error.message, kind, code=code_name(error.code).lower()), headers)


def internal(exc: BaseException) -> HttpError:
    log.error("unexpected error in an HTTP handler", exc_info=exc)
    return HttpError(500, error_body("internal error", "server_error"))


def _name(path: str, names: OpenAINames | None) -> str | None:
    if names is None:
        return path or None
    return names.param(path)


def code_name(code: int) -> str:
    """The name of a google.rpc code ("INVALID_ARGUMENT"), as the request metrics label it."""
    try:
        return str(code_pb2.Code.Name(code))
    except ValueError:
        return str(code)
