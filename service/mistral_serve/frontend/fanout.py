"""One reader per frontend process that follows every open request's event stream.

A single blocking XREAD covers all open requests plus this process's wake stream; each admission
writes to the wake stream (in the same script that queues the request), so a new request joins the
read at once instead of after the block times out.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import redis.asyncio as redis
from redis.exceptions import RedisError

from mistral_serve.common import keys
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Subscription:
    request_id: str
    # Batches of events in stream order, as the worker wrote them.
    batches: asyncio.Queue[list[chat_pb2.ChatEvent]] = field(default_factory=asyncio.Queue)
    last_entry_id: bytes = b"0-0"


class EventFanout:
    def __init__(self, client: redis.Redis, frontend_id: str, *, block_ms: int = 1000) -> None:
        self._redis = client
        self._wake_key = keys.wake_stream(frontend_id).encode()
        self._wake_last = b"0-0"
        self._block_ms = block_ms
        self._subs: dict[bytes, Subscription] = {}
        self.healthy = True

    def open(self, request_id: str) -> Subscription:
        """Start following `request_id`'s events; call before the request is queued."""
        sub = Subscription(request_id)
        self._subs[keys.events_stream(request_id).encode()] = sub
        return sub

    def close(self, request_id: str) -> None:
        self._subs.pop(keys.events_stream(request_id).encode(), None)

    @property
    def open_count(self) -> int:
        return len(self._subs)

    async def run(self) -> None:
        await self._start_wake_stream()
        backoff = 0.05
        while True:
            try:
                await self._read_once()
                backoff = 0.05
                self.healthy = True
            except RedisError as exc:
                self.healthy = False
                log.warning("event reader lost Redis (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _start_wake_stream(self) -> None:
        while True:
            try:
                self._wake_last = await self._redis.xadd(self._wake_key, {b"w": b"0"}, maxlen=100)
                return
            except RedisError as exc:
                log.warning("cannot reach Redis to start the event reader: %s", exc)
                await asyncio.sleep(0.5)

    async def _read_once(self) -> None:
        streams: dict[bytes, bytes] = {self._wake_key: self._wake_last}
        for key, sub in self._subs.items():
            streams[key] = sub.last_entry_id
        reply = await self._redis.xread(streams, block=self._block_ms)  # type: ignore[arg-type]
        for key, entries in reply or []:
            if key == self._wake_key:
                self._wake_last = entries[-1][0]
                continue
            target = self._subs.get(key)
            if target is None:  # closed while the read was in flight
                continue
            for entry_id, fields in entries:
                record = queue_pb2.EventRecord.FromString(fields[keys.EVENT_FIELD.encode()])
                target.batches.put_nowait(list(record.events))
                target.last_entry_id = entry_id
