"""One reader per frontend process that follows every open request's event stream.

A single blocking XREAD covers all followed requests plus this process's wake stream; each admission
writes to the wake stream (in the same script that queues the request), so a new request joins the
read at once instead of after the block times out. Several subscriptions may follow one request
(a caller and a reattached caller, a repeat of an idempotent request), each from its own position.

While a request has a subscription here, this process keeps the request's attached key alive; once
nobody follows it anywhere, the key lapses after the detach grace and a worker cancels the request.

A Redis that comes back without its data (`epoch.RedisEpoch`) is noticed within a restart check: the
attached keys of every followed request are set again at once (so no worker takes them for callers
gone), and so are their owner keys (so their callers can still reattach); workers get a rewrite
window to write back the records they hold, and each followed request whose event stream is still
missing then (it was queued, or its worker is gone too) ends with one retryable error, in seconds
rather than at its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import redis.asyncio as redis
from google.rpc import code_pb2
from redis.exceptions import RedisError

from mistral_serve.common import keys, retry
from mistral_serve.common.contract import error_event
from mistral_serve.common.epoch import RedisEpoch
from mistral_serve.common.event_log import parse_record, read_records
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

from .errors import BackendUnavailable

log = logging.getLogger(__name__)


def lost_event() -> chat_pb2.ChatEvent:
    """The one terminal event of a request whose answer Redis lost (and nobody could restore)."""
    return error_event(
        code_pb2.UNAVAILABLE, "the answer was lost with the queue; send it again", retryable=True
    )


def entry_order(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>") as a comparable pair."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class History:
    """What a request's event stream holds so far."""

    events: list[chat_pb2.ChatEvent]
    last_entry_id: bytes
    # Sequence of the last delta written, 0 before the first.
    last_sequence: int


@dataclass(frozen=True, slots=True)
class Owner:
    """Who started a followed request, and until when (unix time) their owner key is kept: what a
    frontend writes back after a Redis that lost its data, so the caller can still reattach."""

    caller: str
    keep_until: float


@dataclass(eq=False, slots=True)
class Subscription:
    request_id: str
    owner: Owner | None = None
    # Batches of events in stream order, as the worker wrote them.
    batches: asyncio.Queue[list[chat_pb2.ChatEvent]] = field(default_factory=asyncio.Queue)
    last_entry_id: bytes = b"0-0"


class EventFanout:
    def __init__(
        self,
        client: redis.Redis,
        frontend_id: str,
        *,
        pool: str,
        block_ms: int = 1000,
        detach_grace_s: float = 30.0,
        restart_check_s: float = 0.5,
        rewrite_window_s: float = 2.0,
    ) -> None:
        self._redis = client
        self._pool = pool
        self._epoch = RedisEpoch(client, pool)
        self._restart_check_s = restart_check_s
        self._rewrite_window_s = rewrite_window_s
        self._wake_key = keys.wake_stream(pool, frontend_id).encode()
        self._block_ms = block_ms
        self._grace_ms = max(1, int(detach_grace_s * 1000))
        self._subs: dict[bytes, list[Subscription]] = {}
        # What the next XREAD sends: the wake stream and every followed stream, each from the oldest
        # position one of its followers needs. Kept up to date on open, close and each read, so that
        # a wake costs the streams that moved, not a rebuild over every open stream.
        self._positions: dict[bytes, bytes] = {self._wake_key: b"0-0"}

    def open(
        self, request_id: str, *, after_entry_id: bytes = b"0-0", owner: Owner | None = None
    ) -> Subscription:
        """Follow `request_id`'s events after `after_entry_id`; for a new request, call before queuing it."""
        sub = Subscription(request_id, owner=owner, last_entry_id=after_entry_id)
        key = keys.events_stream(self._pool, request_id).encode()
        self._subs.setdefault(key, []).append(sub)
        position = self._positions.get(key)
        if position is None or entry_order(after_entry_id) < entry_order(position):
            self._positions[key] = after_entry_id
        return sub

    def close(self, sub: Subscription) -> None:
        key = keys.events_stream(self._pool, sub.request_id).encode()
        followers = self._subs.get(key, [])
        if sub in followers:
            followers.remove(sub)
        if not followers:
            self._subs.pop(key, None)
            self._positions.pop(key, None)

    async def history(self, request_id: str) -> History:
        """Every event written for `request_id` so far, for a caller who reattaches."""
        try:
            records = await read_records(self._redis, self._pool, request_id)
        except RedisError as exc:
            raise BackendUnavailable(f"the event stream is unreachable: {exc}") from exc
        events = [event for _, record in records for event in record.events]
        sequences = [e.delta.sequence for e in events if e.WhichOneof("event") == "delta"]
        return History(events, records[-1][0] if records else b"0-0", max(sequences, default=0))

    async def attach_now(self, request_id: str) -> None:
        """Mark `request_id` followed at once, and make the blocked read include it now."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(keys.attached_key(self._pool, request_id), b"1", px=self._grace_ms)
                pipe.xadd(self._wake_key, {b"w": b"1"}, maxlen=keys.WAKE_MAXLEN)
                await pipe.execute()
        except RedisError as exc:
            raise BackendUnavailable(f"the event stream is unreachable: {exc}") from exc

    async def run(self) -> None:
        await asyncio.gather(self._read_forever(), self._keep_attached(), self._watch_restarts())

    async def _watch_restarts(self) -> None:
        while True:
            try:
                if await self._epoch.data_lost():
                    await self._recover()
            except RedisError as exc:
                log.debug("restart check: Redis unreachable (%s)", exc)
            await asyncio.sleep(self._restart_check_s)

    async def _recover(self) -> None:
        """After Redis lost its data: mark every followed request attached again now, give workers
        the rewrite window, then end the requests whose events nobody put back."""
        followed = {key: followers[0].request_id for key, followers in self._subs.items() if followers}
        log.warning("Redis came back without its data; %d followed requests to check", len(followed))
        await self._mark_attached(set(followed.values()))
        await self._restore_owners()
        await asyncio.sleep(self._rewrite_window_s)
        streams = list(followed)
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in streams:
                pipe.exists(key)
            present = await pipe.execute()
        for key, exists in zip(streams, present, strict=True):
            if exists:
                continue
            log.warning("request %s was lost with Redis's data", followed[key])
            for sub in self._subs.get(key, []):
                sub.batches.put_nowait([lost_event()])

    async def _restore_owners(self) -> None:
        now = time.time()
        owners = {
            sub.request_id: sub.owner
            for followers in self._subs.values()
            for sub in followers
            if sub.owner is not None and sub.owner.keep_until > now
        }
        if not owners:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, owner in owners.items():
                ttl_s = max(1, int(owner.keep_until - now))
                pipe.set(keys.owner_key(self._pool, request_id), owner.caller.encode(), ex=ttl_s, nx=True)
            await pipe.execute()

    async def _mark_attached(self, request_ids: set[str]) -> None:
        if not request_ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.set(keys.attached_key(self._pool, request_id), b"1", px=self._grace_ms)
            await pipe.execute()

    async def _read_forever(self) -> None:
        self._positions[self._wake_key] = await retry.until_done(
            lambda: self._redis.xadd(self._wake_key, {b"w": b"0"}, maxlen=keys.WAKE_MAXLEN),
            log=log,
            what="starting the event reader",
        )
        await retry.forever(self._read_once, log=log, what="reading events")

    async def _keep_attached(self) -> None:
        """Renew the attached key of every followed request, a third of the grace before it lapses."""
        while True:
            await asyncio.sleep(self._grace_ms / 3000)
            request_ids = {followers[0].request_id for followers in self._subs.values() if followers}
            try:
                await self._mark_attached(request_ids)
            except RedisError as exc:
                log.warning("cannot renew attachments: %s", exc)

    async def _read_once(self) -> None:
        sent = dict(self._positions)
        reply = await self._redis.xread(sent, block=self._block_ms)  # type: ignore[arg-type]
        for key, entries in reply or []:
            if key == self._wake_key:
                self._positions[key] = entries[-1][0]
                continue
            # Closed while the read was in flight: no followers, nothing delivered.
            followers = self._subs.get(key)
            if not followers:
                continue
            records = [(entry_id, parse_record(fields)) for entry_id, fields in entries]
            for sub in followers:
                self._deliver(sub, records, caught_up=sub.last_entry_id == sent.get(key))
            # The oldest position a follower needs (one that opened meanwhile may need older entries).
            self._positions[key] = min((sub.last_entry_id for sub in followers), key=entry_order)

    @staticmethod
    def _deliver(
        sub: Subscription, records: list[tuple[bytes, queue_pb2.EventRecord]], *, caught_up: bool
    ) -> None:
        """Queue the records `sub` has not had; `caught_up`: it had everything before them."""
        last = entry_order(sub.last_entry_id)
        for entry_id, record in records:
            if caught_up or entry_order(entry_id) > last:
                sub.batches.put_nowait(list(record.events))
                sub.last_entry_id = entry_id
