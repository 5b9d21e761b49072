"""Coalesced event writes: every request's pending events go to Redis in one pipelined round trip.

A request's first delta and its terminal event are written at once (time to first token and the
end of a stream are what callers feel); the deltas in between wait up to the flush interval, or
until a request has `max_events` pending, so the worker makes a few writes per engine step
instead of one per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as redis
from redis.exceptions import RedisError

from mistral_serve.common import keys
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

log = logging.getLogger(__name__)


class EventWriter:
    def __init__(self, client: redis.Redis, *, ttl_s: int, interval_s: float, max_events: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._interval_s = interval_s
        self._max_events = max_events
        self._pending: dict[str, list[chat_pb2.ChatEvent]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._has_data = asyncio.Event()
        self._urgent = asyncio.Event()
        self.writes = 0  # round trips made, for tests and benchmarks

    def emit(self, request_id: str, event: chat_pb2.ChatEvent, *, urgent: bool = False) -> None:
        pending = self._pending.setdefault(request_id, [])
        pending.append(event)
        self._has_data.set()
        if urgent or len(pending) >= self._max_events:
            self._urgent.set()

    async def emit_final(self, request_id: str, event: chat_pb2.ChatEvent) -> None:
        """Write `event` now and return once it is in Redis."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        self.emit(request_id, event, urgent=True)
        await done

    async def run(self) -> None:
        backoff = 0.05
        while True:
            await self._has_data.wait()
            if not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self._interval_s)
            batch, self._pending = self._pending, {}
            waiters, self._waiters = self._waiters, []
            self._has_data.clear()
            self._urgent.clear()
            try:
                await self._write(batch)
            except RedisError as exc:
                log.warning("event write failed (%s); retrying in %.2fs", exc, backoff)
                self._requeue(batch, waiters)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _requeue(
        self, batch: dict[str, list[chat_pb2.ChatEvent]], waiters: list[asyncio.Future[None]]
    ) -> None:
        """Put a failed batch back in front of what arrived meanwhile, keeping each request's order."""
        for request_id, events in batch.items():
            self._pending[request_id] = events + self._pending.get(request_id, [])
        self._waiters = waiters + self._waiters
        self._has_data.set()
        self._urgent.set()

    async def _write(self, batch: dict[str, list[chat_pb2.ChatEvent]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, events in batch.items():
                stream = keys.events_stream(request_id)
                record = queue_pb2.EventRecord(events=events)
                pipe.xadd(stream, {keys.EVENT_FIELD: record.SerializeToString()})
                pipe.expire(stream, self._ttl_s)
            await pipe.execute()
        self.writes += 1
