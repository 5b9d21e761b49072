"""One way to build the asyncio Redis client, for both processes."""

from __future__ import annotations

import redis.asyncio as redis


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
