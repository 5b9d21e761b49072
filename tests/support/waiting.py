"""Waiting for a condition in async tests, bounded so that a broken condition fails instead of hanging."""

from __future__ import annotations

import asyncio
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
