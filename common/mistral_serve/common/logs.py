"""Logging setup for both processes: text for people, JSON lines for log pipelines.

Every record carries the current trace and span ids (from the active OpenTelemetry span) and the
request id bound to the running task, so a log line leads to its trace and back.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace

# The request the running task works on; set where a request id is first known (admission, job start).
REQUEST_ID: ContextVar[str | None] = ContextVar("mistral_serve_request_id", default=None)


def bind_request_id(request_id: str) -> None:
    """Tag this task's later log records with `request_id` (tasks it starts inherit it)."""
    REQUEST_ID.set(request_id)


class TraceContextFilter(logging.Filter):
    """Adds `trace_id`, `span_id` and `request_id` to records that do not carry them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        request_id = REQUEST_ID.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._service:
            entry["service"] = self._service
        for key in ("request_id", "trace_id", "span_id"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        ids = [f"{key}={getattr(record, key)}" for key in ("request_id", "trace_id") if hasattr(record, key)]
        return f"{line} [{' '.join(ids)}]" if ids else line


def configure(log_format: str, level: str = "INFO", *, service: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter(service) if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
