"""Coalesced event writes: every request's pending events go to Redis in one round trip.

A request's first delta and its terminal event are written at once (time to first token and the
end of a stream are what callers feel); the deltas in between wait up to the flush interval, or
until a request has `max_events` pending, so the worker makes a few writes per engine step
instead of one per token. A write is one call of a Lua script (`_FLUSH`) whatever the number of
requests in it: one command to pack and one reply to parse, not one XADD (and an EXPIRE) per request.

Each record also carries the engine output its events were made from (token ids, raw text), which
is what a worker taking over a lost job resumes from.

The writer also keeps every record it wrote for a running request (and the records a resumed run
started from), so that after a Redis that came back empty it can write them all again (`rewrite`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis.asyncio as redis
from redis.exceptions import RedisError

from mistral_serve.common import keys, retry
from mistral_serve.common.redis_client import ReplicaWait
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

log = logging.getLogger(__name__)

# KEYS: the event streams of one flush (those whose TTL is (re)set now first), then the request
# stream of each job acked with it. ARGV: the TTL, the record field name, how many event streams have
# their TTL set, how many event streams there are, the consumer group; then, aligned with KEYS (KEYS[i]
# goes with ARGV[i + 5]), each event stream's record and each acked job's entry id. A job's ack is in
# the script that writes its terminal event: both happen, or neither.
_FLUSH = """
local ttl, field, renew, streams, group = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
for i = 1, streams do
  redis.call('XADD', KEYS[i], '*', field, ARGV[i + 5])
  if i <= renew then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
for i = streams + 1, #KEYS do
  redis.call('XACK', KEYS[i], group, ARGV[i + 5])
  redis.call('XDEL', KEYS[i], ARGV[i + 5])
end
return streams
"""


@dataclass(slots=True)
class _Pending:
    events: list[chat_pb2.ChatEvent] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    raw_text: list[str] = field(default_factory=list)
    # Holds the request's terminal event.
    final: bool = False
    # The job's queue entry (request stream, entry id), acked in the write of its terminal event.
    ack: tuple[str, bytes] | None = None

    def record(self) -> queue_pb2.EventRecord:
        return queue_pb2.EventRecord(
            events=self.events, token_ids=self.token_ids, raw_text="".join(self.raw_text)
        )

    def prepend(self, earlier: _Pending) -> None:
        self.events[:0] = earlier.events
        self.token_ids[:0] = earlier.token_ids
        self.raw_text[:0] = earlier.raw_text
        self.final = self.final or earlier.final
        self.ack = self.ack or earlier.ack


class EventWriter:
    def __init__(
        self,
        client: redis.Redis,
        *,
        pool: str,
        ttl_s: int,
        interval_s: float,
        max_events: int,
        replica_wait: ReplicaWait | None = None,
    ) -> None:
        self._redis = client
        self._replica_wait = replica_wait or ReplicaWait()
        self._pool = pool
        self._ttl_s = ttl_s
        self._interval_s = interval_s
        self._max_events = max_events
        self._pending: dict[str, _Pending] = {}
        # When each running request's event stream last had its TTL set (monotonic seconds).
        self._ttl_set_at: dict[str, float] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._has_data = asyncio.Event()
        self._urgent = asyncio.Event()
        # Every record in Redis for each running request, in order: what `rewrite` puts back.
        self._written: dict[str, list[queue_pb2.EventRecord]] = {}
        # Writes and rewrites never interleave: a rewrite replaces a stream whole.
        self._lock = asyncio.Lock()
        self._flush = client.register_script(_FLUSH)
        self.writes = 0  # round trips made, for tests and benchmarks

    def emit(
        self,
        request_id: str,
        event: chat_pb2.ChatEvent,
        *,
        urgent: bool = False,
        token_ids: Iterable[int] = (),
        raw_text: str = "",
    ) -> None:
        """Queue `event`, made from engine output `token_ids`/`raw_text`, for the next write."""
        pending = self._pending.get(request_id)
        if pending is None:  # not setdefault: that would build a _Pending on every event
            pending = self._pending[request_id] = _Pending()
        pending.events.append(event)
        pending.token_ids.extend(token_ids)
        if raw_text:
            pending.raw_text.append(raw_text)
        self._has_data.set()
        if urgent or len(pending.events) >= self._max_events:
            self._urgent.set()

    async def emit_final(
        self, request_id: str, event: chat_pb2.ChatEvent, *, ack: tuple[str, bytes] | None = None
    ) -> None:
        """Write `event` now and return once it is in Redis; with `ack` (the job's request stream and
        entry id), the job is acked by the same script (XACK and XDEL), never one without the other."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        self.emit(request_id, event, urgent=True)
        pending = self._pending[request_id]
        pending.final, pending.ack = True, ack
        await done

    def seed(self, request_id: str, records: Iterable[queue_pb2.EventRecord]) -> None:
        """Records an earlier run wrote for `request_id`, which a resumed run goes on from."""
        self._written[request_id] = list(records)

    def forget(self, request_id: str) -> None:
        """The job ended on this worker: its records are no longer this worker's to restore."""
        self._written.pop(request_id, None)

    async def rewrite(self, request_ids: Iterable[str]) -> int:
        """Write again every record of `request_ids` this worker holds, each stream replaced whole in
        one transaction (a reader sees the old stream or the new one); return the streams written.

        Followers read the rewritten stream from its new ids and drop the deltas they already have.
        """
        async with self._lock:
            streams = {rid: self._written[rid] for rid in request_ids if self._written.get(rid)}
            if not streams:
                return 0
            async with self._redis.pipeline(transaction=True) as pipe:
                for request_id, records in streams.items():
                    stream = keys.events_stream(self._pool, request_id)
                    pipe.delete(stream)
                    for record in records:
                        pipe.xadd(stream, {keys.EVENT_FIELD: record.SerializeToString()})
                    pipe.expire(stream, self._ttl_s)
                await pipe.execute()
            return len(streams)

    async def run(self) -> None:
        backoff = retry.Backoff()
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
                self._requeue(batch, waiters)
                await backoff.wait(log, "event write", exc)
                continue
            backoff.reset()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _requeue(self, batch: dict[str, _Pending], waiters: list[asyncio.Future[None]]) -> None:
        """Put a failed batch back in front of what arrived meanwhile, keeping each request's order."""
        for request_id, earlier in batch.items():
            self._pending.setdefault(request_id, _Pending()).prepend(earlier)
        self._waiters = waiters + self._waiters
        self._has_data.set()
        self._urgent.set()

    async def _write(self, batch: dict[str, _Pending]) -> None:
        async with self._lock:
            await self._write_locked(batch)

    async def _write_locked(self, batch: dict[str, _Pending]) -> None:
        # A stream's TTL is set on its first record, renewed every half TTL, and set again on its last:
        # an EXPIRE per record would double the work of every flush.
        now = time.monotonic()
        records = {request_id: pending.record() for request_id, pending in batch.items()}
        renewed: list[str] = []
        kept: list[str] = []
        for request_id, pending in batch.items():
            set_at = self._ttl_set_at.get(request_id)
            renew = pending.final or set_at is None or now - set_at > self._ttl_s / 2
            (renewed if renew else kept).append(request_id)
        # Two arguments a request (its key, its record): packing them is most of a flush's client CPU.
        order = renewed + kept
        streams = [keys.events_stream(self._pool, request_id) for request_id in order]
        args: list[bytes | int | str] = [
            self._ttl_s,
            keys.EVENT_FIELD,
            len(renewed),
            len(streams),
            keys.WORKER_GROUP,
        ]
        args += [records[request_id].SerializeToString() for request_id in order]
        acks = [pending.ack for pending in batch.values() if pending.ack is not None]
        streams += [stream for stream, _ in acks]
        args += [entry_id for _, entry_id in acks]
        # A terminal event, and its job's ack with it, is on the replicas before emit_final returns.
        finals = [request_id for request_id, pending in batch.items() if pending.final]
        if finals and self._replica_wait.replicas > 0:
            # WAIT counts its own connection's writes, so it follows the script in one pipeline; EVAL,
            # not EVALSHA: a pipeline holding a Script object checks SCRIPT EXISTS first, a round trip.
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.eval(_FLUSH, len(streams), *streams, *args)
                self._replica_wait.add_to(pipe)
                replies = await pipe.execute()
            self._replica_wait.check(replies[-1], f"terminal events of {', '.join(finals)}")
        else:
            await self._flush(keys=streams, args=args)
        for request_id in renewed:
            self._ttl_set_at[request_id] = now
        for request_id, pending in batch.items():
            if pending.final:
                self._ttl_set_at.pop(request_id, None)
                self._written.pop(request_id, None)
            else:
                self._written.setdefault(request_id, []).append(records[request_id])
        self.writes += 1
