"""The worker's queue consumer: claims up to N jobs from the pool's stream and runs them at once.

Each job ends with exactly one terminal event, written before the entry is acked and deleted
(deleting keeps the stream's length equal to the pool's backlog, which admission reads). A job
whose worker was lost is claimed here once its lease lapsed and resumed after what it streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, NamedTuple

import redis.asyncio as redis
from google.rpc import code_pb2
from redis.exceptions import RedisError, ResponseError

from mistral_serve.common import keys
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

from .engine import Engine, EngineRequestError
from .events import EventWriter
from .jobs import Resume, error_event, generate_events
from .leases import Leases

log = logging.getLogger(__name__)

# Why a running job was stopped.
CANCELLED = "cancelled"
DEADLINE = "deadline"
LEASE_LOST = "lease lost"
DETACHED = "detached"


class _EntryRef(NamedTuple):
    stream: str
    entry_id: bytes


class _LeaseLost(Exception):
    """Another worker took this job over: this one must neither write nor ack anything more."""


class Consumer:
    def __init__(
        self,
        client: redis.Redis,
        engine: Engine,
        writer: EventWriter,
        *,
        pool: str,
        consumer_name: str,
        max_inflight: int,
        block_ms: int,
        lease_ms: int = 15000,
        max_attempts: int = 3,
    ) -> None:
        self._redis = client
        self._engine = engine
        self._writer = writer
        self._streams = keys.request_streams(pool)  # highest band first
        self._cancel_channel = keys.cancel_channel(pool)
        self._name = consumer_name
        self._max_inflight = max_inflight
        self._block_ms = block_ms
        self._max_attempts = max_attempts
        self.leases = Leases(client, consumer_name=consumer_name, lease_ms=lease_ms)
        # request id -> the task generating it
        self._running: dict[str, asyncio.Task[chat_pb2.ChatEvent]] = {}
        # request id -> why it was stopped
        self._stop_reasons: dict[str, str] = {}
        # job task -> its (stream, entry id), for leases
        self._jobs: dict[asyncio.Task[None], _EntryRef] = {}
        self._request_of_entry: dict[_EntryRef, str] = {}
        # requests between their cancel check and their start
        self._starting: set[str] = set()
        self._slot_free = asyncio.Event()
        self._claiming = True

    @property
    def inflight(self) -> int:
        return len(self._jobs)

    async def ensure_group(self) -> None:
        for stream in self._streams:
            try:
                # From id 0: requests queued before any worker existed are served too.
                await self._redis.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run(self) -> None:
        """Claim and start new jobs until `stop_claiming`; Redis errors are retried with backoff."""
        backoff = 0.05
        while self._claiming:
            free = await self._wait_for_slots()
            if not free:
                continue
            try:
                await self._read_new(free)
                backoff = 0.05
            except RedisError as exc:
                log.warning("cannot read the queue (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                with contextlib.suppress(RedisError):
                    await self.ensure_group()  # Redis may have restarted empty
                continue

    async def _read_new(self, free: int) -> None:
        """Take up to `free` new jobs, higher bands first; block on all bands when none waits."""
        for stream in self._streams:
            reply = await self._redis.xreadgroup(keys.WORKER_GROUP, self._name, {stream: ">"}, count=free)
            free -= self._start_all(reply, claimed=False)
            if free <= 0:
                return
        if free == self._max_inflight - len(self._jobs):
            reply = await self._redis.xreadgroup(
                keys.WORKER_GROUP,
                self._name,
                dict.fromkeys(self._streams, ">"),
                count=free,
                block=self._block_ms,
            )
            self._start_all(reply, claimed=False)

    def _start_all(self, reply: Any, *, claimed: bool) -> int:
        started = 0
        for stream, entries in reply or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                self._start(_EntryRef(name, entry_id), fields, claimed=claimed)
                started += 1
        return started

    async def run_leases(self) -> None:
        """Renew the leases of running jobs and take over jobs whose lease lapsed elsewhere."""
        interval_s = self.leases.lease_ms / 3000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._renew()
                for stream in self._streams:
                    if self._claiming and (free := self._max_inflight - len(self._jobs)) > 0:
                        lapsed = await self.leases.claim_lapsed(stream, free)
                        self._start_all([(stream, lapsed)], claimed=True)
            except RedisError as exc:
                log.warning("lease upkeep failed: %s", exc)

    async def watch_attachments(self, interval_s: float) -> None:
        """Cancel running requests nobody has followed for their detach grace (their key lapsed)."""
        while True:
            await asyncio.sleep(interval_s)
            request_ids = list(self._running)
            if not request_ids:
                continue
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for request_id in request_ids:
                        pipe.exists(keys.attached_key(request_id))
                    attached = await pipe.execute()
            except RedisError as exc:
                log.warning("cannot check attachments: %s", exc)
                continue
            for request_id, present in zip(request_ids, attached, strict=True):
                if not present:
                    log.info("request %s: nobody attached for its detach grace; cancelling", request_id)
                    self.stop(request_id, DETACHED)

    def stop_claiming(self) -> None:
        self._claiming = False
        self._slot_free.set()

    async def drain(self, grace_s: float) -> None:
        """Let running jobs finish for `grace_s`, then stop the rest and hand them to other workers."""
        self.stop_claiming()
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=grace_s)
        unfinished = dict(self._jobs)
        for task in unfinished:
            task.cancel()
        for task in unfinished:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for stream in self._streams:
            entry_ids = [ref.entry_id for ref in unfinished.values() if ref.stream == stream]
            with contextlib.suppress(RedisError):
                await self.leases.hand_back(stream, entry_ids)
        if unfinished:
            log.info("handed %d unfinished jobs to other workers", len(unfinished))

    async def listen_for_cancels(self) -> None:
        """Abort running jobs whose request a frontend cancelled."""
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._cancel_channel)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self.stop(message["data"].decode(), CANCELLED)
            except RedisError as exc:
                log.warning("cancel listener lost Redis (%s); resubscribing", exc)
                await asyncio.sleep(0.5)

    def stop(self, request_id: str, reason: str) -> None:
        if request_id in self._starting:
            self._stop_reasons[request_id] = reason
            return
        task = self._running.get(request_id)
        if task is not None and not task.done():
            self._stop_reasons[request_id] = reason
            task.cancel()

    async def _wait_for_slots(self) -> int:
        while self._claiming and (free := self._max_inflight - len(self._jobs)) <= 0:
            self._slot_free.clear()
            await self._slot_free.wait()
        return free if self._claiming else 0

    async def _renew(self) -> None:
        for stream in self._streams:
            entry_ids = [ref.entry_id for ref in self._jobs.values() if ref.stream == stream]
            for lost in await self.leases.refresh(stream, entry_ids):
                request_id = self._request_of_entry.get(_EntryRef(stream, lost))
                if request_id is not None:
                    log.warning("lost the lease of request %s to another worker", request_id)
                    self.stop(request_id, LEASE_LOST)

    def _start(self, ref: _EntryRef, fields: dict[bytes, bytes] | None, *, claimed: bool) -> None:
        job = asyncio.get_running_loop().create_task(self._job(ref, fields, claimed=claimed))
        self._jobs[job] = ref
        job.add_done_callback(self._job_done)

    def _job_done(self, job: asyncio.Task[None]) -> None:
        self._jobs.pop(job, None)
        self._slot_free.set()
        if not job.cancelled() and job.exception() is not None:
            log.error("job failed outside its error handling", exc_info=job.exception())

    async def _job(self, ref: _EntryRef, fields: dict[bytes, bytes] | None, *, claimed: bool) -> None:
        try:
            raw = (fields or {})[keys.REQUEST_FIELD.encode()]
            queued = queue_pb2.QueuedRequest.FromString(raw)
        except Exception:
            log.error("dropping unreadable queue entry %s of %s", ref.entry_id, ref.stream)
            await self._ack(ref)
            return
        request_id = queued.request_id
        self._request_of_entry[ref] = request_id
        try:
            terminal = await self._terminal_event(ref, queued, claimed=claimed)
            if terminal is not None:
                await self._writer.emit_final(request_id, terminal)
            await self._ack(ref)
        except _LeaseLost:
            return
        finally:
            self._request_of_entry.pop(ref, None)

    async def _terminal_event(
        self, ref: _EntryRef, queued: queue_pb2.QueuedRequest, *, claimed: bool
    ) -> chat_pb2.ChatEvent | None:
        """Run the job if it should run; its terminal event, or None when one was written already."""
        resume: Resume | None = None
        if claimed:
            attempts = await self.leases.delivery_count(ref.stream, ref.entry_id)
            resume = await self._read_resume(queued.request_id)
            if resume.finished:
                return None  # the lost worker wrote the end but died before its ack
            if attempts > self._max_attempts:
                return error_event(
                    code_pb2.UNAVAILABLE,
                    f"the request was started {attempts - 1} times and each time its worker was lost",
                    retryable=True,
                )
            log.info(
                "resuming request %s after %d tokens (run %d)",
                queued.request_id,
                len(resume.token_ids),
                attempts,
            )
        skip = await self._why_skip(queued)
        if skip is not None:
            return skip
        return await self._generate(queued, resume)

    async def _read_resume(self, request_id: str) -> Resume:
        entries = await self._redis.xrange(keys.events_stream(request_id))
        records = [queue_pb2.EventRecord.FromString(f[keys.EVENT_FIELD.encode()]) for _, f in entries]
        return Resume.from_records(records)

    async def _why_skip(self, queued: queue_pb2.QueuedRequest) -> chat_pb2.ChatEvent | None:
        """The terminal event of a job that must not reach the engine, or None to run it."""
        if queued.deadline_unix <= time.time():
            return error_event(
                code_pb2.DEADLINE_EXCEEDED, "the request's deadline passed while it was queued"
            )
        # One round trip, and no cancel slips through it: a cancel message that arrives while the flag
        # is read is recorded by `stop` and seen here.
        request_id = queued.request_id
        self._starting.add(request_id)
        try:
            flagged = await self._redis.exists(keys.cancel_flag(request_id))
        finally:
            self._starting.discard(request_id)
        reason = self._stop_reasons.pop(request_id, None)
        if reason == LEASE_LOST:
            raise _LeaseLost()
        if flagged or reason is not None:
            return error_event(code_pb2.CANCELLED, "the request was cancelled before it started")
        return None

    async def _generate(self, queued: queue_pb2.QueuedRequest, resume: Resume | None) -> chat_pb2.ChatEvent:
        request_id = queued.request_id
        loop = asyncio.get_running_loop()
        task = loop.create_task(generate_events(self._engine, self._writer, queued, resume))
        self._running[request_id] = task
        deadline = loop.call_later(
            max(queued.deadline_unix - time.time(), 0.0), self.stop, request_id, DEADLINE
        )
        try:
            return await task
        except asyncio.CancelledError:
            reason = self._stop_reasons.pop(request_id, None)
            if reason is None or not task.cancelled():
                raise  # this worker is stopping: leave the job unacked for another one
            await self._engine.abort(request_id)
            if reason == LEASE_LOST:
                raise _LeaseLost() from None
            if reason == DEADLINE:
                return error_event(code_pb2.DEADLINE_EXCEEDED, "the request's deadline passed")
            if reason == DETACHED:
                return error_event(code_pb2.CANCELLED, "nobody followed the request for its detach grace")
            return error_event(code_pb2.CANCELLED, "the request was cancelled")
        except EngineRequestError as exc:
            return error_event(code_pb2.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            log.exception("request %s failed in the engine", request_id)
            return error_event(code_pb2.INTERNAL, f"the engine failed: {exc}", retryable=True)
        finally:
            deadline.cancel()
            self._running.pop(request_id, None)
            self._stop_reasons.pop(request_id, None)

    async def _ack(self, ref: _EntryRef) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xack(ref.stream, keys.WORKER_GROUP, ref.entry_id)
            pipe.xdel(ref.stream, ref.entry_id)
            await pipe.execute()
