"""Retrying Redis work with capped exponential backoff: the one loop both processes use.

A process that loses Redis keeps trying (Redis comes back, or the pod is restarted by its probes);
it logs each failure and waits longer each time, up to a cap, and starts short again after a success.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

from redis.exceptions import RedisError

T = TypeVar("T")

INITIAL_S = 0.05
CAP_S = 2.0


class Backoff:
    """The delay before the next try: doubles per failure up to `cap_s`, back to `initial_s` on reset."""

    def __init__(self, initial_s: float = INITIAL_S, cap_s: float = CAP_S) -> None:
        self._initial_s = initial_s
        self._cap_s = cap_s
        self.delay_s = initial_s

    def reset(self) -> None:
        self.delay_s = self._initial_s

    async def wait(self, log: logging.Logger, what: str, exc: BaseException) -> None:
        """Log that `what` failed with `exc`, then sleep the current delay and lengthen it."""
        log.warning("%s failed (%s); retrying in %.2fs", what, exc, self.delay_s)
        await asyncio.sleep(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self._cap_s)


async def until_done(
    op: Callable[[], Awaitable[T]], *, log: logging.Logger, what: str, backoff: Backoff | None = None
) -> T:
    """`op()`'s result, retried while it raises RedisError."""
    backoff = backoff or Backoff()
    while True:
        try:
            result = await op()
        except RedisError as exc:
            await backoff.wait(log, what, exc)
            continue
        backoff.reset()
        return result


async def forever(op: Callable[[], Awaitable[object]], *, log: logging.Logger, what: str) -> NoReturn:
    """Run `op()` again and again; a RedisError waits out the backoff, a success resets it."""
    backoff = Backoff()
    while True:
        await until_done(op, log=log, what=what, backoff=backoff)
