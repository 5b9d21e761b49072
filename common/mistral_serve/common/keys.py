"""The Redis key layout: the one place that names what frontends and workers share in Redis."""

from __future__ import annotations

PREFIX = "mistral_serve"
WORKER_GROUP = "workers"
# Field names inside stream entries.
REQUEST_FIELD = "r"
EVENT_FIELD = "e"


# Priority bands, in the order workers take from them. A request's band is the sign of its priority.
HIGH, NORMAL, LOW = "high", "normal", "low"
BANDS = (HIGH, NORMAL, LOW)


def band_of(priority: int) -> str:
    return HIGH if priority > 0 else LOW if priority < 0 else NORMAL


def request_stream(pool: str, band: str = NORMAL) -> str:
    """A stream of queued requests of one model pool and band; workers read it as group WORKER_GROUP.

    The normal band keeps the plain name, which is what most traffic and the autoscaler watch.
    """
    return f"{PREFIX}:{pool}:requests" if band == NORMAL else f"{PREFIX}:{pool}:requests:{band}"


def request_streams(pool: str) -> list[str]:
    """All of a pool's request streams, highest band first."""
    return [request_stream(pool, band) for band in BANDS]


def cancel_channel(pool: str) -> str:
    """Pub/sub channel on which frontends announce cancelled request ids to the pool's workers."""
    return f"{PREFIX}:{pool}:cancel"


def events_stream(request_id: str) -> str:
    """The short-lived stream of one request's events (batches of ChatEvent), written by a worker."""
    return f"{PREFIX}:req:{request_id}:events"


def cancel_flag(request_id: str) -> str:
    """Set when a request is cancelled, so a worker that has not started it yet skips it."""
    return f"{PREFIX}:req:{request_id}:cancelled"


def wake_stream(frontend_id: str) -> str:
    """Written on each admission so the frontend's blocked event reader picks up the new request."""
    return f"{PREFIX}:frontend:{frontend_id}:wake"


def owner_key(request_id: str) -> str:
    """Who started a request (a digest of their API key or certificate): only they may reattach or
    cancel it. Lives as long as the request's events."""
    return f"{PREFIX}:req:{request_id}:owner"


def attached_key(request_id: str) -> str:
    """Present while some caller follows the request; frontends renew it, and it lapses one detach
    grace after the last caller left. A worker cancels a running request whose key lapsed."""
    return f"{PREFIX}:req:{request_id}:attached"


def epoch_key(pool: str) -> str:
    """A random value set once and never expired: a Redis that comes back without it lost its data
    (`epoch.RedisEpoch`)."""
    return f"{PREFIX}:{pool}:epoch"
