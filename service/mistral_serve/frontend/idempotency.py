"""A repeated client_request_id gets the first run's events instead of a second run.

The key is the caller's identity plus their client_request_id, so two callers never share a run.
The first request claims the key (SET NX, for the idempotency window) with its request id and a
fingerprint of the request; a repeat with the same fingerprint replays the first run's event
stream from its start, live while it runs; a repeat with another request under the same id is
refused (INVALID_ARGUMENT on client_request_id). A request refused at admission releases the key.

Replays read the event stream with their own XREAD, not through the process's fan-out reader: the
fan-out follows one subscriber per request id, and the first run's caller may be on this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator

import redis.asyncio as redis
from google.rpc import code_pb2
from redis.exceptions import RedisError

from mistral_serve.common import keys
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

from .errors import BackendUnavailable, FieldViolation, InvalidRequest

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def fingerprint(request: chat_pb2.ChatRequest) -> str:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


def idempotency_key(caller: str, client_request_id: str) -> str:
    digest = hashlib.sha256(f"{caller}\0{client_request_id}".encode()).hexdigest()
    return f"{keys.PREFIX}:idem:{digest}"


class Idempotency:
    def __init__(self, client: redis.Redis, *, ttl_s: int, block_ms: int = 1000) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._block_ms = block_ms
        self._release = client.register_script(_RELEASE)

    async def claim(
        self, caller: str, client_request_id: str, print_: str, request_id: str, *, path: str
    ) -> str | None:
        """None when this request runs (it holds the key now); else the request id of the first run."""
        key = idempotency_key(caller, client_request_id)
        value = f"{request_id} {print_}"
        try:
            if await self._redis.set(key, value, nx=True, ex=self._ttl_s):
                return None
            existing = await self._redis.get(key)
        except RedisError as exc:
            raise BackendUnavailable(f"the idempotency store is unreachable: {exc}") from exc
        if existing is None:  # expired between the two calls: this one is the first now
            retried: str | None = await self.claim(caller, client_request_id, print_, request_id, path=path)
            return retried
        text: str = existing.decode()
        first_id, _, first_print = text.partition(" ")
        if first_print != print_:
            raise InvalidRequest(
                [
                    FieldViolation(
                        f"{path}client_request_id",
                        "this client_request_id was used for a different request within the idempotency "
                        "window; use a new id for a new request",
                    )
                ]
            )
        return first_id

    async def release(self, caller: str, client_request_id: str, print_: str, request_id: str) -> None:
        """Free the key of a request that was not admitted, so a retry runs."""
        with contextlib.suppress(RedisError):  # else the key expires with its window
            await self._release(
                keys=[idempotency_key(caller, client_request_id)], args=[f"{request_id} {print_}"]
            )

    async def replay(self, request_id: str, deadline: float) -> AsyncIterator[chat_pb2.ChatEvent]:
        """The events of `request_id` from the start, following them live, until its terminal event."""
        stream = keys.events_stream(request_id)
        last = b"0-0"
        last_sequence = 0
        while True:
            remaining_ms = int((deadline - time.time()) * 1000)
            if remaining_ms <= 0:
                yield _deadline_event()
                return
            try:
                reply = await self._redis.xread({stream: last}, block=min(self._block_ms, remaining_ms))
            except RedisError as exc:
                raise BackendUnavailable(f"the event stream is unreachable: {exc}") from exc
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    record = queue_pb2.EventRecord.FromString(fields[keys.EVENT_FIELD.encode()])
                    for event in record.events:
                        kind = event.WhichOneof("event")
                        if kind == "delta":
                            if event.delta.sequence <= last_sequence:
                                continue
                            last_sequence = event.delta.sequence
                        yield event
                        if kind in ("finished", "error"):
                            return
            await asyncio.sleep(0)


def _deadline_event() -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(
        error=chat_pb2.Error(
            code=code_pb2.DEADLINE_EXCEEDED, message="the request's deadline passed", retryable=True
        )
    )
