"""The Redis key layout: the one place that names what frontends and workers share in Redis.

Every key of a pool carries the hash tag `{<pool>}`, so Redis Cluster puts all of a pool's keys in
one slot: the admission script (the band streams, the frontend's wake stream, the request's owner
and attached keys) and the fan-out's one XREAD over a frontend's wake stream and every followed
request's events touch one slot, as Cluster requires of a script or a multi-key command. The price:
a pool lives on one shard; a deployment scales Redis by pools (docs/redis.md).
"""

from __future__ import annotations

import hashlib

PREFIX = "mistral_serve"
WORKER_GROUP = "workers"
# Field names inside stream entries.
REQUEST_FIELD = "r"
EVENT_FIELD = "e"
# Entries a frontend's wake stream keeps: its reader only needs the newest one.
WAKE_MAXLEN = 100


# Priority bands, in the order workers take from them. A request's band is the sign of its priority.
HIGH, NORMAL, LOW = "high", "normal", "low"
BANDS = (HIGH, NORMAL, LOW)


def band_of(priority: int) -> str:
    return HIGH if priority > 0 else LOW if priority < 0 else NORMAL


def pool_tag(pool: str) -> str:
    """`{pool}`: the hash tag every key of the pool carries. A brace in the name would end the tag
    early and split the pool over slots, so such a name is refused."""
    if not pool or "{" in pool or "}" in pool:
        raise ValueError(f"a pool name must be non-empty and hold no braces: {pool!r}")
    return "{" + pool + "}"


def _pool_key(pool: str, *parts: str) -> str:
    return ":".join((PREFIX, pool_tag(pool), *parts))


def request_stream(pool: str, band: str = NORMAL) -> str:
    """A stream of queued requests of one model pool and band; workers read it as group WORKER_GROUP.

    The normal band keeps the plain name, which is what most traffic and the autoscaler watch.
    """
    return _pool_key(pool, "requests") if band == NORMAL else _pool_key(pool, "requests", band)


def request_streams(pool: str) -> list[str]:
    """All of a pool's request streams, highest band first."""
    return [request_stream(pool, band) for band in BANDS]


def waiting_count(pool: str, band: str) -> str:
    """A LIST with one element per request of the band waiting for a worker (fair_queue.py): what
    admission bounds beside the running ones, and what the autoscaler reads (LLEN)."""
    return _pool_key(pool, "waiting", band)


def waiting_counts(pool: str) -> list[str]:
    """All of a pool's waiting counts, highest band first."""
    return [waiting_count(pool, band) for band in BANDS]


def caller_queue_prefix(pool: str, band: str) -> str:
    """The name of a caller's LIST of waiting requests in a band, less the caller's name (the take
    script finds the callers' lists from the ring, so it builds the names from this prefix)."""
    return _pool_key(pool, "fair", band, "caller") + ":"


def caller_queue(pool: str, band: str, caller: str) -> str:
    return caller_queue_prefix(pool, band) + caller


def fair_ring(pool: str, band: str) -> str:
    """A LIST of the callers with requests waiting in a band, in round-robin order."""
    return _pool_key(pool, "fair", band, "ring")


def fair_deficits(pool: str, band: str) -> str:
    """A HASH of each ring caller's deficit in a band: the tokens it may still be served this turn."""
    return _pool_key(pool, "fair", band, "deficits")


def fair_weights(pool: str, band: str) -> str:
    """A HASH of each ring caller's weight in a band (set at admission): its quantum's multiplier."""
    return _pool_key(pool, "fair", band, "weights")


def work_wake_stream(pool: str) -> str:
    """Written on each admission so that idle workers, blocked on it, take the new request."""
    return _pool_key(pool, "work", "wake")


def cancel_channel(pool: str) -> str:
    """Pub/sub channel on which frontends announce cancelled request ids to the pool's workers."""
    return _pool_key(pool, "cancel")


def events_stream(pool: str, request_id: str) -> str:
    """The short-lived stream of one request's events (batches of ChatEvent), written by a worker."""
    return _pool_key(pool, "req", request_id, "events")


def cancel_flag(pool: str, request_id: str) -> str:
    """Set when a request is cancelled, so a worker that has not started it yet skips it."""
    return _pool_key(pool, "req", request_id, "cancelled")


def wake_stream(pool: str, frontend_id: str) -> str:
    """Written on each admission so the frontend's blocked event reader picks up the new request."""
    return _pool_key(pool, "frontend", frontend_id, "wake")


def owner_key(pool: str, request_id: str) -> str:
    """Who started a request (a digest of their API key or certificate): only they may reattach or
    cancel it. Lives as long as the request's events."""
    return _pool_key(pool, "req", request_id, "owner")


def attached_key(pool: str, request_id: str) -> str:
    """Present while some caller follows the request; frontends renew it, and it lapses one detach
    grace after the last caller left. A worker cancels a running request whose key lapsed."""
    return _pool_key(pool, "req", request_id, "attached")


def idempotency_key(pool: str, caller: str, client_request_id: str) -> str:
    """A caller's client_request_id, claimed by its first run: the caller's identity and the id, hashed
    (neither is stored readable, and two callers never share a key)."""
    digest = hashlib.sha256(f"{caller}\0{client_request_id}".encode()).hexdigest()
    return _pool_key(pool, "idem", digest)


def quota_keys(pool: str, caller: str) -> list[str]:
    """A caller's quota state, in the order the admission script reads it: its requests-per-second
    bucket and its tokens-per-minute bucket (HASHes: level, refill time), and the ZSET of its
    requests in flight scored by their deadline (ms, Redis's clock). Each expires once idle."""
    return [_pool_key(pool, "quota", caller, part) for part in ("rps", "tpm", "inflight")]


def epoch_key(pool: str) -> str:
    """A random value set once and never expired: a Redis that comes back without it lost its data
    (`epoch.RedisEpoch`)."""
    return _pool_key(pool, "epoch")
