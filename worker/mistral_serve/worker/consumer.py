"""The worker's queue consumer: takes up to N jobs of the pool (fair_queue.py) and runs them at once.

Each job ends with exactly one terminal event, written before the entry is acked and deleted
(deleting keeps the stream's length equal to the pool's backlog, which admission reads). A job
whose worker was lost is claimed (`watchers.keep_leases`) once its lease lapsed and resumed after
what it streamed. Each claimed entry is one `Job`; what may stop it is in `job.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio as redis
from google.rpc import code_pb2
from redis.exceptions import RedisError, ResponseError

from mistral_serve.common import keys, quota, retry
from mistral_serve.common.contract import error_event
from mistral_serve.common.event_log import read_records
from mistral_serve.common.fair_queue import Entry, FairTake
from mistral_serve.common.retry import Backoff
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

from .engine import Engine, EngineRequestError, EngineStopped
from .events import EventWriter
from .job import EntryRef, HandBack, Job, LeaseLost, StopReason, stopped_event
from .jobs import Resume, generate_events
from .leases import Leases
from .tracing import WorkerTelemetry

log = logging.getLogger(__name__)
T = TypeVar("T")


class Consumer:
    def __init__(
        self,
        client: redis.Redis,
        engine: Engine,
        writer: EventWriter,
        telemetry: WorkerTelemetry,
        *,
        pool: str,
        consumer_name: str,
        max_inflight: int,
        block_ms: int,
        lease_ms: int = 3000,
        max_attempts: int = 3,
        fair_quantum_tokens: int = 512,
    ) -> None:
        self._redis = client
        self._engine = engine
        self._writer = writer
        self._telemetry = telemetry
        self.pool = pool
        self.streams = keys.request_streams(pool)  # highest band first
        self._name = consumer_name
        self._max_inflight = max_inflight
        self._block_ms = block_ms
        self._max_attempts = max_attempts
        self.leases = Leases(client, consumer_name=consumer_name, lease_ms=lease_ms)
        self._take = FairTake(
            client, pool=pool, consumer_name=consumer_name, quantum_tokens=fair_quantum_tokens
        )
        self._jobs: dict[EntryRef, Job] = {}
        # Jobs that ended unfinished because the worker stopped, for `drain` to hand back.
        self._handed_back: list[EntryRef] = []
        self._slot_free = asyncio.Event()
        self._claiming = True

    @property
    def claiming(self) -> bool:
        return self._claiming

    @property
    def inflight(self) -> int:
        return len(self._jobs)

    def held(self) -> list[Job]:
        return list(self._jobs.values())

    def find(self, request_id: str) -> Job | None:
        return next((job for job in self._jobs.values() if job.request_id == request_id), None)

    def free_slots(self) -> int:
        return self._max_inflight - len(self._jobs) if self._claiming else 0

    async def ensure_group(self) -> None:
        for stream in self.streams:
            try:
                # From id 0: requests queued before any worker existed are served too.
                await self._redis.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run(self) -> None:
        """Claim and start new jobs until `stop_claiming`; Redis errors are retried with backoff."""
        backoff = Backoff()
        while self._claiming:
            free = await self._wait_for_slots()
            if not free:
                continue
            try:
                await self.read_new(free)
                backoff.reset()
            except RedisError as exc:
                await backoff.wait(log, "reading the queue", exc)
                with contextlib.suppress(RedisError):
                    await self.ensure_group()  # Redis may have restarted empty
                continue

    async def read_new(self, free: int) -> int:
        """Start up to `free` new jobs, higher bands first and callers in turn (`fair_queue.TAKE`);
        when none waited, block until an admission (or `block_ms`) and take once more."""
        taken, wake_id = await self._take.take(free)
        started = self._start_all(taken)
        if started == 0 and wake_id is not None:
            await self._redis.xread({self._take.wake_stream: wake_id}, count=1, block=self._block_ms)
            taken, _ = await self._take.take(free)
            started = self._start_all(taken)
        return started

    def _start_all(self, taken: list[tuple[str, list[Entry]]]) -> int:
        for stream, entries in taken:
            for entry_id, fields in entries:
                self._start(EntryRef(stream, entry_id), fields, claimed=False)
        return sum(len(entries) for _, entries in taken)

    def start_claimed(self, stream: str, entries: Sequence[Entry]) -> None:
        """Start jobs taken over from another worker (their lease lapsed)."""
        for entry_id, fields in entries:
            self._start(EntryRef(stream, entry_id), fields, claimed=True)

    def stop_claiming(self) -> None:
        self._claiming = False
        self._slot_free.set()

    async def drain(self, grace_s: float) -> None:
        """Let running jobs finish for `grace_s`, then stop the rest and hand them to other workers."""
        self.stop_claiming()
        tasks = {job.task for job in self._jobs.values() if job.task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        unfinished = list(self._jobs.values())
        for job in unfinished:
            if job.task is not None:
                job.task.cancel()
        for job in unfinished:
            if job.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await job.task
        refs = [job.ref for job in unfinished] + self._handed_back
        for stream in self.streams:
            entry_ids = [ref.entry_id for ref in refs if ref.stream == stream]
            with contextlib.suppress(RedisError):
                await self.leases.hand_back(stream, entry_ids)
        if refs:
            log.info("handed %d unfinished jobs to other workers", len(refs))

    async def _wait_for_slots(self) -> int:
        while self._claiming and self.free_slots() <= 0:
            self._slot_free.clear()
            await self._slot_free.wait()
        return self.free_slots()

    def _start(self, ref: EntryRef, fields: dict[bytes, bytes] | None, *, claimed: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            queued = queue_pb2.QueuedRequest.FromString((fields or {})[keys.REQUEST_FIELD.encode()])
        except Exception:
            log.error("dropping unreadable queue entry %s of %s", ref.entry_id, ref.stream)
            queued = None
        # An unreadable entry is a job too (with no request id) while its ack runs: it holds a slot.
        job = Job(ref, queue_pb2.QueuedRequest() if queued is None else queued)
        self._jobs[ref] = job
        job.task = loop.create_task(self._ack(ref) if queued is None else self._run_job(job, claimed=claimed))
        job.task.add_done_callback(lambda task: self._job_done(job, task))

    def _job_done(self, job: Job, task: asyncio.Task[None]) -> None:
        if self._jobs.get(job.ref) is job:
            del self._jobs[job.ref]
        self._writer.forget(job.request_id)
        self._slot_free.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("job failed outside its error handling", exc_info=task.exception())

    async def _run_job(self, job: Job, *, claimed: bool) -> None:
        try:
            terminal = await self._terminal_event(job, claimed=claimed)
        except LeaseLost:
            return
        except HandBack:
            self._handed_back.append(job.ref)
            return
        if terminal is None:
            await self._ack(job.ref)  # the end is written already: only the ack was missing
            return
        # One write: the terminal event and the ack. The settle follows; a worker lost in between
        # leaves it undone, as a job found finished when taken over is not settled again.
        await self._writer.emit_final(job.request_id, terminal, ack=(job.ref.stream, job.ref.entry_id))
        await quota.settle(self._redis, self.pool, job.queued, terminal)
        self._telemetry.metrics.job_ended(terminal)

    async def _terminal_event(self, job: Job, *, claimed: bool) -> chat_pb2.ChatEvent | None:
        """Run the job if it should run; its terminal event, or None when one was written already."""
        resume: Resume | None = None
        if claimed:
            job.attempt = await self._retried(
                lambda: self.leases.delivery_count(job.ref.stream, job.ref.entry_id), job, "reading its runs"
            )
            records = [
                record
                for _, record in await self._retried(
                    lambda: read_records(self._redis, self.pool, job.request_id), job, "reading its records"
                )
            ]
            resume = Resume.from_records(records)
            self._writer.seed(job.request_id, records)
            if resume.finished:
                return None  # the lost worker wrote the end but died before its ack
            if job.attempt > self._max_attempts:
                return error_event(
                    code_pb2.UNAVAILABLE,
                    f"the request was started {job.attempt - 1} times and each time its worker was lost",
                    retryable=True,
                )
            log.info(
                "resuming request %s after %d tokens (run %d)",
                job.request_id,
                len(resume.token_ids),
                job.attempt,
            )
        skip = await self._why_skip(job)
        if skip is not None:
            return skip
        return await self._generate(job, resume)

    async def _why_skip(self, job: Job) -> chat_pb2.ChatEvent | None:
        """The terminal event of a job that must not reach the engine, or None to run it."""
        if job.queued.deadline_unix <= time.time():
            return error_event(
                code_pb2.DEADLINE_EXCEEDED, "the request's deadline passed while it was queued"
            )
        # A cancel message that arrives while the flag is read is recorded by `Job.stop`, seen below.
        if await self._retried(
            lambda: self._redis.exists(keys.cancel_flag(self.pool, job.request_id)),
            job,
            "reading its cancel flag",
        ):
            job.stop(StopReason.CANCELLED)
        if job.stop_reason is not None:
            return stopped_event(job.stop_reason, started=False)
        return None

    async def _retried(self, op: Callable[[], Awaitable[T]], job: Job, what: str) -> T:
        """`op()` (a Redis read a job's start needs), retried while Redis is unreachable: a start
        that meets a Redis blip waits it out instead of leaving the job for its lease."""
        return await retry.until_done(op, log=log, what=f"starting request {job.request_id}: {what}")

    async def _generate(self, job: Job, resume: Resume | None) -> chat_pb2.ChatEvent:
        loop = asyncio.get_running_loop()
        job.generation = loop.create_task(
            generate_events(
                self._engine, self._writer, job.queued, self._telemetry, resume=resume, attempt=job.attempt
            )
        )
        deadline = loop.call_later(
            max(job.queued.deadline_unix - time.time(), 0.0), job.stop, StopReason.DEADLINE
        )
        try:
            return await job.generation
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if job.stop_reason is None or (current is not None and current.cancelling()):
                raise  # this worker is stopping: leave the job unacked for another one
            self._telemetry.metrics.aborts.inc()
            await self._engine.abort(job.request_id)
            return stopped_event(job.stop_reason, started=True)
        except EngineRequestError as exc:
            return error_event(code_pb2.INVALID_ARGUMENT, str(exc))
        except EngineStopped as exc:
            if not self._claiming:  # expected: the engine goes with the worker (Ctrl-C reaches both)
                log.info("request %s: %s as the worker stops; left for another worker", job.request_id, exc)
                raise HandBack() from exc
            log.error("request %s: %s", job.request_id, exc)
            return error_event(code_pb2.INTERNAL, f"the engine failed: {exc}", retryable=True)
        except Exception as exc:
            log.exception("request %s failed in the engine", job.request_id)
            return error_event(code_pb2.INTERNAL, f"the engine failed: {exc}", retryable=True)
        finally:
            deadline.cancel()
            job.ended = True

    async def _ack(self, ref: EntryRef) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xack(ref.stream, keys.WORKER_GROUP, ref.entry_id)
            pipe.xdel(ref.stream, ref.entry_id)
            await pipe.execute()
