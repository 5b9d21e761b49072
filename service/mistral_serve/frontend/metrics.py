"""The frontend's Prometheus metrics: requests by outcome and code, their duration and time to first
delta, in-flight RPCs, admissions (by band, and by caller with the tokens charged), and the pool's
queue depth, lag and oldest wait.

Per-caller series are labelled by the caller's name when the keys file lists it and `other`
otherwise (`Caller.metric_label`), so unlisted callers cannot grow the series without bound.

Each frontend has its own registry (so in-process test stacks never share series); `/metrics`
serves it together with the process-wide default registry.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.exceptions import RedisError

from mistral_serve.common import fair_queue, keys

log = logging.getLogger(__name__)

# Seconds; the OpenTelemetry advice for gen_ai.server.request.duration, down to 10 ms.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# Seconds; the OpenTelemetry advice for gen_ai.server.time_to_first_token.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class FrontendMetrics:
    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mistral_serve_requests",
            "Requests ended, by door (grpc, http), method, outcome (ok, error, cancelled) and gRPC /"
            " google.rpc code.",
            ["door", "method", "outcome", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "mistral_serve_request_duration_seconds",
            "Request duration at the frontend, from its arrival to its last message (end to end).",
            ["door", "method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_delta = Histogram(
            "mistral_serve_time_to_first_token_seconds",
            "Streaming requests: time from the request's arrival to the first delta sent to the caller.",
            ["door", "method"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "mistral_serve_inflight_requests",
            "Requests being served right now.",
            ["door", "method"],
            registry=r,
        )
        self.admissions = Counter(
            "mistral_serve_queue_admissions",
            "Admission attempts by priority band and result (admitted, full, quota, unavailable).",
            ["pool", "band", "result"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "mistral_serve_queue_depth",
            "Requests of the pool's band waiting or running (what admission bounds).",
            ["pool", "band"],
            registry=r,
        )
        self.queue_lag = Gauge(
            "mistral_serve_queue_lag",
            "Requests of the band waiting for a worker (in its callers' fair-queue lists).",
            ["pool", "band"],
            registry=r,
        )
        self.queue_oldest_wait = Gauge(
            "mistral_serve_queue_oldest_waiting_seconds",
            "Age of the oldest request no worker has claimed yet (0 when none waits).",
            ["pool", "band"],
            registry=r,
        )

        self.caller_admissions = Counter(
            "mistral_serve_caller_admissions",
            "Admission attempts by caller (listed name or `other`) and result: admitted, full, or the"
            " quota limit that refused it (requests_per_second, tokens_per_minute, requests_in_flight).",
            ["pool", "caller", "result"],
            registry=r,
        )
        self.caller_tokens_charged = Counter(
            "mistral_serve_caller_tokens_charged",
            "Tokens charged at admission by caller (prompt plus max_tokens; workers true them up).",
            ["pool", "caller"],
            registry=r,
        )

    def admitted(self, band: str, result: str) -> None:
        self.admissions.labels(self.pool, band, result).inc()

    def caller_admitted(self, caller: str, result: str, cost_tokens: int) -> None:
        self.caller_admissions.labels(self.pool, caller, result).inc()
        if cost_tokens:
            self.caller_tokens_charged.labels(self.pool, caller).inc(cost_tokens)


async def sample_queue(client: redis.Redis, metrics: FrontendMetrics, interval_s: float) -> None:
    """Keep the queue gauges current: one pipelined round trip per interval."""
    while True:
        try:
            await _sample_once(client, metrics)
        except RedisError as exc:
            log.debug("queue metrics: Redis does not answer: %s", exc)
        await asyncio.sleep(interval_s)


async def _sample_once(client: redis.Redis, metrics: FrontendMetrics) -> None:
    now = time.time()
    for band in keys.BANDS:
        async with client.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.request_stream(metrics.pool, band))
            pipe.llen(keys.waiting_count(metrics.pool, band))
            pipe.lindex(keys.waiting_count(metrics.pool, band), 0)  # the oldest waiting request's time
            running, waiting, oldest = await pipe.execute()
        wait = 0.0 if oldest is None else max(now - fair_queue.waiting_since(oldest), 0.0)
        metrics.queue_depth.labels(metrics.pool, band).set(int(running) + int(waiting))
        metrics.queue_lag.labels(metrics.pool, band).set(int(waiting))
        metrics.queue_oldest_wait.labels(metrics.pool, band).set(wait)
