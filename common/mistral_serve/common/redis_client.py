"""One way to build the asyncio Redis client, for both processes."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger(__name__)

STANDALONE, SENTINEL, CLUSTER = "standalone", "sentinel", "cluster"
MODES = (STANDALONE, SENTINEL, CLUSTER)


@dataclass(frozen=True)
class RedisConnection:
    """How both processes reach Redis: one block of settings (SharedSettings.redis_connection).

    `url` is `redis://` or `rediss://` (TLS); in sentinel mode only its scheme and database count, the
    primary's address comes from the sentinels. A password given separately (from a Secret) wins over
    one in the URL.
    """

    url: str
    password: str | None = None
    mode: str = STANDALONE
    # TLS (rediss://): the CA bundle that signed the server's certificate (empty: the system CAs), and
    # a client certificate and key for servers that require one.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Sentinel: "host:port" of each sentinel, the name they monitor the primary by, their own password.
    sentinels: tuple[str, ...] = ()
    sentinel_master: str = "mymaster"
    sentinel_password: str | None = None

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"

    def tls_kwargs(self) -> dict[str, object]:
        if not self.tls:
            return {}
        return {
            "ssl_ca_certs": self.tls_ca_file,
            "ssl_certfile": self.tls_cert_file,
            "ssl_keyfile": self.tls_key_file,
        }


@dataclass(frozen=True)
class ReplicaWait:
    """WAIT after the writes a failover must not lose (docs/redis.md, "Failover"): an admission before
    the caller gets `started`, a terminal event before its job is acked. WAIT counts only its own
    connection's writes, so it goes at the end of the same pipeline. 0 replicas: off.

    When fewer replicas than asked confirm within the timeout, the write stands and a warning is
    logged: refusing would let one lost replica stop the whole service.
    """

    replicas: int = 0
    timeout_ms: int = 200

    def add_to(self, pipe: Any) -> bool:
        if self.replicas <= 0:
            return False
        pipe.wait(self.replicas, self.timeout_ms)
        return True

    def check(self, acked: int, what: str) -> None:
        if int(acked) < self.replicas:
            log.warning(
                "%s: %d of %d replicas confirmed within %d ms; a failover now could lose it",
                what,
                acked,
                self.replicas,
                self.timeout_ms,
            )


def sentinel_address(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a sentinel address is host:port, not {text!r}")
    return host, int(port)


def connect(conn: RedisConnection, *, max_connections: int = 64) -> redis.Redis:
    """A pooled client in `conn`'s mode: redis-py's own Redis, Sentinel-managed Redis or RedisCluster.

    The cluster client is typed as a Redis here: it answers every command the service sends (each
    script and multi-key command touches one slot, keys.py); pub/sub goes through `pubsub_client`.
    """
    kwargs: dict[str, object] = {
        "health_check_interval": 10,
        "socket_connect_timeout": 2.0,
        "socket_keepalive": True,
        **conn.tls_kwargs(),
    }
    if conn.password:
        kwargs["password"] = conn.password
    if conn.mode == CLUSTER:
        return cast(redis.Redis, RedisCluster.from_url(conn.url, max_connections=max_connections, **kwargs))
    if conn.mode == SENTINEL:
        return _sentinel_primary(conn, max_connections, kwargs)
    if conn.mode != STANDALONE:
        raise ValueError(f"unknown Redis mode {conn.mode!r}; one of {', '.join(MODES)}")
    return redis.Redis.from_url(conn.url, max_connections=max_connections, **kwargs)  # type: ignore[arg-type]


def _sentinel_primary(conn: RedisConnection, max_connections: int, kwargs: dict[str, object]) -> redis.Redis:
    if not conn.sentinels:
        raise ValueError("sentinel mode needs the sentinels' addresses (MISTRAL_SERVE_REDIS_SENTINELS)")
    db = urlsplit(conn.url).path.strip("/") or "0"
    sentinel_kwargs: dict[str, object] = {"socket_connect_timeout": 2.0, **conn.tls_kwargs()}
    if conn.tls:
        sentinel_kwargs["ssl"] = True
    if conn.sentinel_password:
        sentinel_kwargs["password"] = conn.sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [sentinel_address(a) for a in conn.sentinels],
        sentinel_kwargs=sentinel_kwargs,
        db=int(db),
        ssl=conn.tls,
        **kwargs,
    )
    # The pool asks the sentinels for the primary on each new connection and drops its connections
    # when a failover makes the old primary a replica (READONLY), so commands follow the new primary.
    primary: redis.Redis = sentinel.master_for(conn.sentinel_master, max_connections=max_connections)
    return primary


# What a cluster's connection settings and a plain client's have in common (auth, timeouts, TLS).
_PLAIN_CLIENT_KWARGS = frozenset(inspect.signature(redis.Redis.__init__).parameters)


def pubsub_client(client: redis.Redis, channel: str) -> redis.Redis:
    """A client that can SUBSCRIBE to `channel`: `client` itself, or for a cluster (whose asyncio client
    has no pub/sub) a plain client on the node serving the channel's slot, where a PUBLISH reaches."""
    if not isinstance(client, RedisCluster):
        return client
    node = client.get_node_from_key(channel)
    given = client.get_connection_kwargs()
    kwargs = {k: v for k, v in given.items() if k in _PLAIN_CLIENT_KWARGS and k not in ("host", "port")}
    kwargs["ssl"] = issubclass(given.get("connection_class", Connection), SSLConnection)
    return redis.Redis(host=node.host, port=node.port, **kwargs)


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
