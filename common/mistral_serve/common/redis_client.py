"""One way to build the asyncio Redis client, for both processes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import cast

import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

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


# The only eviction policy under which Redis never drops a key: a queue entry or an event stream that
# Redis evicts is a request lost without an error.
SAFE_EVICTION_POLICY = "noeviction"


class EvictingRedis(SystemExit):
    """Raised at startup when Redis may evict keys; a SystemExit so the process stops with its message
    (exit status 1) rather than a traceback."""


async def refuse_evicting_redis(client: redis.Redis, timeout_s: float = 5.0) -> None:
    """Stop the process when Redis's `maxmemory-policy` is not `noeviction`.

    Where the policy cannot be read (a managed Redis that renames or denies CONFIG, or a Redis not up
    yet) log a warning and go on: the operator has to check the setting there.
    """
    try:
        reply = await asyncio.wait_for(
            cast("Awaitable[dict[bytes | str, bytes | str]]", client.config_get("maxmemory-policy")),
            timeout=timeout_s,
        )
    except ResponseError as exc:
        log.warning(
            "cannot read Redis maxmemory-policy (%s); make sure it is %s, or evicted requests are lost",
            exc,
            SAFE_EVICTION_POLICY,
        )
        return
    except (RedisError, TimeoutError, OSError) as exc:
        log.warning("Redis does not answer (%s): maxmemory-policy not checked", exc)
        return
    policy = _text(next(iter(reply.values()), b""))
    if policy == SAFE_EVICTION_POLICY:
        return
    message = (
        f"Redis maxmemory-policy is {policy or 'unset'!r}: Redis may evict queued requests and event "
        f"streams, which loses requests without an error. Set maxmemory-policy {SAFE_EVICTION_POLICY} "
        f"(CONFIG SET maxmemory-policy {SAFE_EVICTION_POLICY}, or in redis.conf / the managed Redis's "
        "parameter group)."
    )
    log.critical(message)
    raise EvictingRedis(message)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
