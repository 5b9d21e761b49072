"""The worker's queue consumer: claims up to N jobs from the pool's stream and runs them at once.

Each job ends with exactly one terminal event, written before the entry is acked and deleted
(deleting keeps the stream's length equal to the pool's backlog, which admission reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as redis
from google.rpc import code_pb2
from redis.exceptions import RedisError, ResponseError

from mistral_serve.common import keys
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

from .engine import Engine, EngineRequestError
from .events import EventWriter
from .jobs import error_event, generate_events

log = logging.getLogger(__name__)


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
    ) -> None:
        self._redis = client
        self._engine = engine
        self._writer = writer
        self._stream = keys.request_stream(pool)
        self._cancel_channel = keys.cancel_channel(pool)
        self._name = consumer_name
        self._max_inflight = max_inflight
        self._block_ms = block_ms
        # request id -> the task generating it
        self._running: dict[str, asyncio.Task[chat_pb2.ChatEvent]] = {}
        # request id -> why it was stopped ("cancelled" or "deadline")
        self._stop_reasons: dict[str, str] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._claiming = True

    @property
    def inflight(self) -> int:
        return len(self._jobs)

    async def ensure_group(self) -> None:
        try:
            # From id 0: requests queued before any worker existed are served too.
            await self._redis.xgroup_create(self._stream, keys.WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Claim and start jobs until `stop_claiming`; Redis errors are retried with backoff."""
        backoff = 0.05
        while self._claiming:
            free = self._max_inflight - len(self._jobs)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                reply = await self._redis.xreadgroup(
                    keys.WORKER_GROUP, self._name, {self._stream: ">"}, count=free, block=self._block_ms
                )
                backoff = 0.05
            except RedisError as exc:
                log.warning("cannot read the queue (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                with contextlib.suppress(RedisError):
                    await self.ensure_group()
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    self._start(entry_id, fields)

    def stop_claiming(self) -> None:
        self._claiming = False
        self._slot_free.set()

    async def drain(self, grace_s: float) -> None:
        """Let running jobs finish for `grace_s`; stop the rest unacked, for another worker to claim."""
        self.stop_claiming()
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=grace_s)
        for task in list(self._jobs):
            task.cancel()
        for task in list(self._jobs):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def listen_for_cancels(self) -> None:
        """Abort running jobs whose request a frontend cancelled."""
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._cancel_channel)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self.stop(message["data"].decode(), "cancelled")
            except RedisError as exc:
                log.warning("cancel listener lost Redis (%s); resubscribing", exc)
                await asyncio.sleep(0.5)

    def stop(self, request_id: str, reason: str) -> None:
        task = self._running.get(request_id)
        if task is not None and not task.done():
            self._stop_reasons[request_id] = reason
            task.cancel()

    def _start(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        job = asyncio.get_running_loop().create_task(self._job(entry_id, fields))
        self._jobs.add(job)
        job.add_done_callback(self._job_done)

    def _job_done(self, job: asyncio.Task[None]) -> None:
        self._jobs.discard(job)
        self._slot_free.set()
        if not job.cancelled() and job.exception() is not None:
            log.error("job failed outside its error handling", exc_info=job.exception())

    async def _job(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            queued = queue_pb2.QueuedRequest.FromString(fields[keys.REQUEST_FIELD.encode()])
        except Exception:
            log.error("dropping unreadable queue entry %s", entry_id)
            await self._ack(entry_id)
            return
        request_id = queued.request_id
        skip = await self._why_skip(queued)
        if skip is not None:
            await self._writer.emit_final(request_id, skip)
            await self._ack(entry_id)
            return
        terminal = await self._generate(queued)
        await self._writer.emit_final(request_id, terminal)
        await self._ack(entry_id)

    async def _why_skip(self, queued: queue_pb2.QueuedRequest) -> chat_pb2.ChatEvent | None:
        """The terminal event of a job that must not reach the engine, or None to run it."""
        if queued.deadline_unix <= time.time():
            return error_event(
                code_pb2.DEADLINE_EXCEEDED, "the request's deadline passed while it was queued"
            )
        if await self._redis.exists(keys.cancel_flag(queued.request_id)):
            return error_event(code_pb2.CANCELLED, "the request was cancelled before it started")
        return None

    async def _generate(self, queued: queue_pb2.QueuedRequest) -> chat_pb2.ChatEvent:
        request_id = queued.request_id
        loop = asyncio.get_running_loop()
        task = loop.create_task(generate_events(self._engine, self._writer, queued))
        self._running[request_id] = task
        deadline = loop.call_later(
            max(queued.deadline_unix - time.time(), 0.0), self.stop, request_id, "deadline"
        )
        try:
            # A cancel that arrived between the skip check and registering the task.
            if await self._redis.exists(keys.cancel_flag(request_id)):
                self.stop(request_id, "cancelled")
            return await task
        except asyncio.CancelledError:
            reason = self._stop_reasons.pop(request_id, None)
            if reason is None or not task.cancelled():
                raise  # this worker is stopping: leave the job unacked for another one
            await self._engine.abort(request_id)
            if reason == "deadline":
                return error_event(code_pb2.DEADLINE_EXCEEDED, "the request's deadline passed")
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

    async def _ack(self, entry_id: bytes) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xack(self._stream, keys.WORKER_GROUP, entry_id)
            pipe.xdel(self._stream, entry_id)
            await pipe.execute()
