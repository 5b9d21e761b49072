"""The frontend's side of the queue: admit requests into the pool's stream, announce cancels."""

from __future__ import annotations

import redis.asyncio as redis
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from redis.exceptions import RedisError

from mistral_serve.common import fair_queue, keys, quota
from mistral_serve.common.logs import bind_request_id
from mistral_serve.common.redis_client import ReplicaWait
from mistral_serve.common.telemetry import get_tracer
from mistral_serve.common.tracecontext import inject_into
from mistral_serve.queue.v1 import queue_pb2

from .callers import OTHER
from .errors import BackendUnavailable, QueueFull, QuotaExceeded
from .metrics import FrontendMetrics

# Admission is one atomic step so that concurrent frontends never push the backlog past its bound
# nor a caller past its quota. The backlog is the pool's waiting requests (the bands' waiting counts,
# fair_queue.py) plus its running ones (the band streams' lengths: workers delete entries once they
# are done with them). KEYS: the band streams, the waiting counts, this frontend's wake stream, the
# request's owner and attached keys, then `fair_queue.enqueue_keys`, then the caller's quota keys
# (`quota.admission_keys`, last: its fragments read them from the end). The frontend wake entry breaks
# this frontend's blocked event reader; the owner and attached keys are set with the entry, never
# after. The quota is checked first and charged only once the backlog bound let the request in.
_BACKLOG_CHECK = """
local backlog = 0
for i = 1, 6 do
  backlog = backlog + (i <= 3 and redis.call('XLEN', KEYS[i]) or redis.call('LLEN', KEYS[i]))
end
if backlog >= tonumber(ARGV[1]) then
  return false
end
"""
_ENQUEUE = """
fair_enqueue(KEYS[10], KEYS[11], KEYS[12], KEYS[13], KEYS[14], ARGV[7], ARGV[8], ARGV[2], ARGV[6])
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[6], '*', 'w', '1')
redis.call('EXPIRE', KEYS[7], 3600)
redis.call('SET', KEYS[8], ARGV[3], 'EX', ARGV[4])
redis.call('SET', KEYS[9], '1', 'PX', ARGV[5])
return backlog + 1
"""
_ADMIT = fair_queue.ENQUEUE + quota.ADMIT_CHECK + _BACKLOG_CHECK + quota.ADMIT_CHARGE + _ENQUEUE


def admission_bound(max_backlog: int, band: str) -> int:
    """The backlog up to which a band is admitted: when the pool is contended, low priority is
    refused first, and high priority keeps a reserve of an eighth above the normal bound."""
    if band == keys.HIGH:
        return max_backlog + max(1, max_backlog // 8)
    if band == keys.LOW:
        return max(1, max_backlog * 3 // 4)
    return max_backlog


class RequestQueue:
    def __init__(
        self,
        client: redis.Redis,
        *,
        pool: str,
        max_backlog: int,
        retry_after_s: float,
        frontend_id: str,
        cancel_ttl_s: int,
        detach_grace_s: float = 30.0,
        tracer: trace.Tracer | None = None,
        metrics: FrontendMetrics | None = None,
        replica_wait: ReplicaWait | None = None,
    ) -> None:
        self._replica_wait = replica_wait or ReplicaWait()
        self._redis = client
        self._pool = pool
        self._streams = keys.request_streams(pool)
        self._waiting = keys.waiting_counts(pool)
        self._cancel_channel = keys.cancel_channel(pool)
        self._wake = keys.wake_stream(pool, frontend_id)
        self._max_backlog = max_backlog
        self._retry_after_s = retry_after_s
        self._cancel_ttl_s = cancel_ttl_s
        self._detach_grace_ms = max(1, int(detach_grace_s * 1000))
        self._admit = client.register_script(_ADMIT)
        self._tracer = tracer or get_tracer()
        self._metrics = metrics

    async def admit(
        self,
        queued: queue_pb2.QueuedRequest,
        *,
        owner: str,
        limits: quota.Quota = quota.UNLIMITED,
        caller_label: str = OTHER,
    ) -> None:
        """Queue `queued` in its priority band, or raise QueueFull when the band's bound is reached
        and QuotaExceeded when its caller (`queued.caller`) is at one of `limits`.

        It waits among the requests of its caller (`queued.caller`, else `owner`), served in turn
        with the band's other callers in proportion to `limits.weight`, by `queued.cost_tokens`.
        `owner` (the caller's identity) alone may reattach to or cancel it, for as long as its events
        are kept: until its deadline plus the event retention. `caller_label` names the caller in
        the metrics.
        """
        weight = limits.weight
        if not fair_queue.MIN_WEIGHT <= weight <= fair_queue.MAX_WEIGHT:
            raise ValueError(
                f"a caller's weight must be from {fair_queue.MIN_WEIGHT} to {fair_queue.MAX_WEIGHT}, "
                f"not {weight}"
            )
        band = keys.band_of(queued.request.priority)
        bound = admission_bound(self._max_backlog, band)
        owner_ttl_s = max(1, int(queued.deadline_unix - queued.admitted_unix) + self._cancel_ttl_s)
        request_id = queued.request_id
        caller = queued.caller or owner
        queued.nothing_to_settle = quota.nothing_to_settle(limits)
        span = self._start_producer(queued, band)
        script_keys = [
            *self._streams,
            *self._waiting,
            self._wake,
            keys.owner_key(self._pool, request_id),
            keys.attached_key(self._pool, request_id),
            *fair_queue.enqueue_keys(self._pool, band, caller),
            *quota.admission_keys(self._pool, caller),
        ]
        args: list[bytes | str | int | float] = [
            bound,
            fair_queue.pack_entry(queued.cost_tokens, queued.admitted_unix, queued.SerializeToString()),
            owner,
            owner_ttl_s,
            self._detach_grace_ms,
            keys.WAKE_MAXLEN,
            caller,
            repr(float(weight)),
            *quota.admission_args(
                limits,
                cost_tokens=queued.cost_tokens,
                request_id=request_id,
                deadline_ms=int((queued.deadline_unix - queued.admitted_unix) * 1000),
                in_flight_retry_ms=int(self._retry_after_s * 1000),
            ),
        ]
        try:
            if self._replica_wait.replicas <= 0:
                # No pipeline without WAIT: a cluster client refuses scripts inside one.
                position = await self._admit(keys=script_keys, args=args)
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    await self._admit(client=pipe, keys=script_keys, args=args)
                    # Replicated before the caller learns the request id, so a failover cannot lose it.
                    self._replica_wait.add_to(pipe)
                    position, acked = await pipe.execute()
                if position is not None and quota.refusal(position) is None:
                    self._replica_wait.check(acked, f"admission of {request_id}")
        except RedisError as exc:
            self._end_producer(span, band, "unavailable", error=exc)
            raise BackendUnavailable(f"the queue is unreachable: {exc}") from exc
        refused = quota.refusal(position)
        if refused is not None:
            error = QuotaExceeded(caller, refused.limit, refused.retry_ms / 1000)
            self._end_producer(span, band, "quota", error=error)
            self._caller_metrics(caller_label, refused.limit)
            raise error
        if position is None:
            self._end_producer(span, band, "full")
            self._caller_metrics(caller_label, "full")
            raise QueueFull(bound, self._retry_after_s)
        self._end_producer(span, band, "admitted")
        self._caller_metrics(caller_label, "admitted", queued.cost_tokens)

    def _start_producer(self, queued: queue_pb2.QueuedRequest, band: str) -> Span:
        """The PRODUCER span of this admission, its context written into `queued` for the worker."""
        stream = keys.request_stream(self._pool, band)
        bind_request_id(queued.request_id)
        span = self._tracer.start_span(
            f"send {stream}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": stream,
                "mistral_serve.request_id": queued.request_id,
                "mistral_serve.priority_band": band,
            },
        )
        inject_into(queued, trace.set_span_in_context(span))
        return span

    def _end_producer(self, span: Span, band: str, result: str, *, error: Exception | None = None) -> None:
        if result != "admitted":
            span.set_attribute("error.type", type(error).__qualname__ if error else "QueueFull")
            span.set_status(Status(StatusCode.ERROR, str(error) if error else "the queue is full"))
        span.end()
        if self._metrics is not None:
            self._metrics.admitted(band, result)

    def _caller_metrics(self, label: str, result: str, cost_tokens: int = 0) -> None:
        if self._metrics is not None:
            self._metrics.caller_admitted(label, result, cost_tokens)

    async def cancel(self, request_id: str) -> None:
        """Mark `request_id` cancelled: a flag for a worker yet to start it, a message for one running it."""
        # Two round trips, not a pipeline, and PUBLISH as a raw command: the asyncio cluster client
        # has no publish() and refuses PUBLISH in a pipeline; a cluster forwards it to every node.
        await self._redis.set(keys.cancel_flag(self._pool, request_id), b"1", ex=self._cancel_ttl_s)
        await self._redis.execute_command("PUBLISH", self._cancel_channel, request_id)  # type: ignore[no-untyped-call]

    async def owner(self, request_id: str) -> str | None:
        """The identity that started `request_id`, or None if no such request is kept."""
        try:
            value = await self._redis.get(keys.owner_key(self._pool, request_id))
        except RedisError as exc:
            raise BackendUnavailable(f"the queue is unreachable: {exc}") from exc
        return None if value is None else bytes(value).decode()
