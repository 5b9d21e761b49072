"""The loops that stop or take over jobs from outside: cancels from the frontends, callers that are
gone for their detach grace, and the leases (renewed for the jobs held, taken over when lapsed
elsewhere). Each only finds the job and calls `Job.stop` with its reason; the job decides the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from mistral_serve.common import keys
from mistral_serve.common.fair_queue import Entry
from mistral_serve.common.redis_client import pubsub_client

from .job import EntryRef, Job, StopReason
from .leases import Leases

log = logging.getLogger(__name__)


class Jobs(Protocol):
    """What the watchers need of the consumer that holds the jobs."""

    def held(self) -> list[Job]: ...

    def find(self, request_id: str) -> Job | None: ...

    def free_slots(self) -> int: ...

    def start_claimed(self, stream: str, entries: Sequence[Entry]) -> None: ...


async def listen_for_cancels(client: redis.Redis, channel: str, jobs: Jobs) -> None:
    """Stop the jobs whose request a frontend cancelled."""
    while True:
        try:
            async with pubsub_client(client, channel).pubsub() as pubsub:
                await pubsub.subscribe(channel)
                async for message in pubsub.listen():
                    if message["type"] == "message" and (job := jobs.find(message["data"].decode())):
                        job.stop(StopReason.CANCELLED)
        except RedisError as exc:
            log.warning("cancel listener lost Redis (%s); resubscribing", exc)
            await asyncio.sleep(0.5)


async def watch_attachments(
    client: redis.Redis, jobs: Jobs, pool: str, interval_s: float, renewal_s: float
) -> None:
    """Stop running jobs nobody has followed for their detach grace (their attachment key lapsed).

    A job is stopped only once its key was missing for `renewal_s`, the period at which frontends
    renew it: a Redis that came back empty has lost every key, and the frontends put them back
    within that period, so a missing key alone is not a caller gone.
    """
    missing_since: dict[str, float] = {}
    while True:
        await asyncio.sleep(interval_s)
        running = [job for job in jobs.held() if job.generation is not None and not job.ended]
        running_ids = {job.request_id for job in running}
        for request_id in [rid for rid in missing_since if rid not in running_ids]:
            del missing_since[request_id]
        if not running:
            continue
        try:
            async with client.pipeline(transaction=False) as pipe:
                for job in running:
                    pipe.exists(keys.attached_key(pool, job.request_id))
                attached = await pipe.execute()
        except RedisError as exc:
            log.warning("cannot check attachments: %s", exc)
            continue
        now = time.monotonic()
        for job, present in zip(running, attached, strict=True):
            if present:
                missing_since.pop(job.request_id, None)
                continue
            if now - missing_since.setdefault(job.request_id, now) >= renewal_s:
                log.info("request %s: nobody attached for its detach grace; cancelling", job.request_id)
                job.stop(StopReason.DETACHED)


async def keep_leases(
    leases: Leases, jobs: Jobs, streams: Sequence[str], restarted: Callable[[], Awaitable[bool]]
) -> None:
    """Renew the leases of the jobs held and take over jobs whose lease lapsed on another worker.

    `restarted` is asked before a missing entry counts as a lease lost: after a Redis that came back
    empty every entry is missing, and those jobs are this worker's to finish (`restarts`).
    """
    while True:
        await asyncio.sleep(leases.lease_ms / 3000)
        try:
            for stream in streams:
                await _renew(leases, jobs, stream, restarted)
            for stream in streams:
                if (free := jobs.free_slots()) > 0:
                    jobs.start_claimed(stream, await leases.claim_lapsed(stream, free))
        except RedisError as exc:
            log.warning("lease upkeep failed: %s", exc)


async def _renew(leases: Leases, jobs: Jobs, stream: str, restarted: Callable[[], Awaitable[bool]]) -> None:
    held = {job.ref: job for job in jobs.held() if job.ref.stream == stream and not job.unleased}
    lost = await leases.refresh(stream, [ref.entry_id for ref in held])
    if lost:
        await restarted()
    for entry_id in lost:
        job = held.get(EntryRef(stream, entry_id))
        if job is not None and not job.unleased:
            log.warning("lost the lease of request %s to another worker", job.request_id)
            job.stop(StopReason.LEASE_LOST)
