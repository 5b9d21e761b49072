"""Waiting for a condition in tests, bounded so that a broken condition fails instead of hanging."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable


async def until(condition: Callable[[], bool], timeout_s: float = 30.0, interval_s: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(interval_s)


async def until_async(
    condition: Callable[[], Awaitable[bool]], timeout_s: float = 30.0, interval_s: float = 0.05
) -> None:
    """`until` for a condition that must ask a server (an RPC, an HTTP probe) to be answered."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not await condition():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(interval_s)


def until_sync(
    condition: Callable[..., object],
    what: str,
    *,
    timeout_s: float = 30.0,
    interval_s: float = 0.05,
    ignoring: tuple[type[BaseException], ...] = (),
) -> None:
    """`until` outside an event loop (a process starting up, asked with a sync client): `condition`
    raising one of `ignoring` counts as not yet; RuntimeError naming `what` after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(*ignoring):
            if condition():
                return
        if time.monotonic() > end:
            raise RuntimeError(f"{what} within {timeout_s:.0f}s")
        time.sleep(interval_s)
