"""The Redis key layout: the one place that names what frontends and workers share in Redis."""

from __future__ import annotations

PREFIX = "mistral_serve"
WORKER_GROUP = "workers"
# Field names inside stream entries.
REQUEST_FIELD = "r"
EVENT_FIELD = "e"


def request_stream(pool: str) -> str:
    """The stream of queued requests of one model pool; workers read it as group WORKER_GROUP."""
    return f"{PREFIX}:{pool}:requests"


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
