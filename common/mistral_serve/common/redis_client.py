"""One way to build the asyncio Redis client, for both processes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import cast

import redis.asyncio as redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


def connect(url: str, password: str | None, *, max_connections: int = 64) -> redis.Redis:
    """A pooled client; a password given separately (from a Secret) wins over one in the URL."""
    kwargs: dict[str, object] = {
        "max_connections": max_connections,
        "health_check_interval": 10,
        "socket_connect_timeout": 2.0,
        "socket_keepalive": True,
    }
    if password:
        kwargs["password"] = password
    return redis.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]


async def answers(client: redis.Redis, timeout_s: float) -> bool:
    """Whether Redis answers a PING within `timeout_s` (readiness of both processes)."""
    try:
        # redis-py types ping() as sync-or-async; on the asyncio client it is always awaitable.
        return bool(await asyncio.wait_for(cast("Awaitable[bool]", client.ping()), timeout=timeout_s))
    except (RedisError, TimeoutError, OSError) as exc:
        log.warning("readiness: Redis does not answer: %s", exc)
        return False
