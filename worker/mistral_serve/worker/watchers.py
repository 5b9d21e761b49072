"""The loops that stop or take over jobs from outside: cancels from the frontends, callers that are
gone for their detach grace, and the leases (renewed for the jobs held, taken over when lapsed
elsewhere). Each only finds the job and calls `Job.stop` with its reason; the job decides the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from mistral_serve.common import keys
from mistral_serve.common.redis_client import pubsub_client

from .job import EntryRef, Job, StopReason
from .leases import Entry, Leases

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


async def watch_attachments(client: redis.Redis, jobs: Jobs, pool: str, interval_s: float) -> None:
    """Stop running jobs nobody has followed for their detach grace (their attachment key lapsed)."""
    while True:
        await asyncio.sleep(interval_s)
        running = [job for job in jobs.held() if job.generation is not None and not job.ended]
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
        for job, present in zip(running, attached, strict=True):
            if not present:
                log.info("request %s: nobody attached for its detach grace; cancelling", job.request_id)
                job.stop(StopReason.DETACHED)


async def keep_leases(leases: Leases, jobs: Jobs, streams: Sequence[str]) -> None:
    """Renew the leases of the jobs held and take over jobs whose lease lapsed on another worker."""
    while True:
        await asyncio.sleep(leases.lease_ms / 3000)
        try:
            for stream in streams:
                await _renew(leases, jobs, stream)
            for stream in streams:
                if (free := jobs.free_slots()) > 0:
                    jobs.start_claimed(stream, await leases.claim_lapsed(stream, free))
        except RedisError as exc:
            log.warning("lease upkeep failed: %s", exc)


async def _renew(leases: Leases, jobs: Jobs, stream: str) -> None:
    held = {job.ref: job for job in jobs.held() if job.ref.stream == stream}
    for lost in await leases.refresh(stream, [ref.entry_id for ref in held]):
        job = held.get(EntryRef(stream, lost))
        if job is not None:
            log.warning("lost the lease of request %s to another worker", job.request_id)
            job.stop(StopReason.LEASE_LOST)
