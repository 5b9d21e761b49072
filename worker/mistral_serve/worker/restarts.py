"""A worker's answer to a Redis that came back without its data (`epoch.RedisEpoch` notices it).

What this worker holds in memory is put back at once: the consumer group, and every record of the
jobs it runs, in one transaction. Their queue entries are gone, so no lease is left to keep and no
other worker can claim them: the jobs are marked unleased and run to their end here (the lease
upkeep must not read their missing entries as a lease lost to another worker).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from mistral_serve.common.epoch import RedisEpoch

from .events import EventWriter
from .watchers import Jobs

log = logging.getLogger(__name__)


class RestartGuard:
    def __init__(
        self, epoch: RedisEpoch, writer: EventWriter, jobs: Jobs, ensure_group: Callable[[], Awaitable[None]]
    ) -> None:
        self._epoch = epoch
        self._writer = writer
        self._jobs = jobs
        self._ensure_group = ensure_group
        # One check at a time: a second caller waits until what the first found is restored.
        self._lock = asyncio.Lock()

    async def check(self) -> bool:
        """Restore what this worker holds if Redis lost its data since the last check; whether it had."""
        async with self._lock:
            if not await self._epoch.data_lost():
                return False
            held = self._jobs.held()
            for job in held:
                job.unleased = True
            await self._ensure_group()
            rewritten = await self._writer.rewrite(job.request_id for job in held if job.request_id)
            log.warning(
                "Redis came back without its data: wrote back the records of %d of the %d jobs held",
                rewritten,
                len(held),
            )
            return True


async def watch_restarts(guard: RestartGuard, interval_s: float) -> None:
    while True:
        try:
            await guard.check()
        except RedisError as exc:
            log.debug("restart check: Redis unreachable (%s)", exc)
        await asyncio.sleep(interval_s)
