"""Every worker setting, read from the environment in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mistral_serve.common.env import env_bool, env_float, env_int, env_opt_str, env_str
from mistral_serve.common.settings import SharedSettings


@dataclass(frozen=True)
class WorkerSettings(SharedSettings):
    """The worker's settings; those it shares with the frontend are `SharedSettings`' fields."""

    # Consumer name in the pool's group; unique per worker process.
    consumer_name: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    # Jobs in flight at once: the engine batches them (continuous batching).
    max_inflight: int = 64
    # Deltas of a request are gathered this long before one write (the first token goes at once).
    flush_interval_ms: float = 5.0
    # ...or until this many deltas of one request wait.
    flush_max_events: int = 64
    # After SIGTERM, in-flight jobs get this long to finish; the rest are left for other workers.
    drain_grace_s: float = 120.0
    # gRPC health server: "" answers liveness, "mistral_serve.worker" readiness.
    health_host: str = "[::]"
    health_port: int = 50052
    # A running job's lease: refreshed every third of it; a job whose lease lapsed (its worker was
    # lost) is claimed by another worker, which resumes it after the tokens already streamed.
    lease_ms: int = 3000
    # Runs of one request (first run plus resumes) before it ends with an error.
    max_attempts: int = 3
    # How often running requests are checked for a caller still attached (see DETACH_GRACE_S).
    attach_check_interval_s: float = 1.0
    # How often Redis is checked for a restart that lost its data (`restarts.RestartGuard`).
    restart_check_interval_s: float = 0.5
    # How long an idle worker waits for an admission before it looks at the queue again.
    block_ms: int = 1000
    # Fair queueing within a band: the tokens a caller of weight 1 is credited per turn of the band's
    # callers (deficit round robin, fair_queue.py). A caller may run ahead of another by about a
    # quantum plus one request; smaller interleaves callers finer, and costs a take one pass over the
    # band's waiting callers whenever a request costs more than a quantum.
    fair_quantum_tokens: int = 512
    # "vllm", or "package.module:factory" for a callable returning an Engine.
    engine: str = "vllm"
    # The worker's own metrics port, beside a frontend's on the same host.
    metrics_port: int | None = 9091
    # Record message contents (prompt and output text) on generation spans; off: never recorded.
    trace_content: bool = False
    # Deep health: a one-token generation this often, answered as "mistral_serve.worker.deep"; 0 is off.
    deep_health_interval_s: float = 0.0
    # How long one deep check may take before it counts as failed.
    deep_health_timeout_s: float = 30.0

    @classmethod
    def from_env(cls) -> WorkerSettings:
        return cls(
            **cls.shared_from_env(),
            consumer_name=env_opt_str("WORKER_NAME") or f"{os.uname().nodename}-{os.getpid()}",
            max_inflight=env_int("WORKER_MAX_INFLIGHT", cls.max_inflight, minimum=1),
            flush_interval_ms=env_float("FLUSH_INTERVAL_MS", cls.flush_interval_ms, minimum=0.0),
            flush_max_events=env_int("FLUSH_MAX_EVENTS", cls.flush_max_events, minimum=1),
            health_host=env_str("HEALTH_HOST", cls.health_host),
            health_port=env_int("HEALTH_PORT", cls.health_port, minimum=0),
            block_ms=env_int("BLOCK_MS", cls.block_ms, minimum=1),
            lease_ms=env_int("LEASE_MS", cls.lease_ms, minimum=100),
            fair_quantum_tokens=env_int("FAIR_QUANTUM_TOKENS", cls.fair_quantum_tokens, minimum=1),
            max_attempts=env_int("MAX_ATTEMPTS", cls.max_attempts, minimum=1),
            attach_check_interval_s=env_float(
                "ATTACH_CHECK_INTERVAL_S", cls.attach_check_interval_s, minimum=0.01
            ),
            restart_check_interval_s=env_float(
                "RESTART_CHECK_INTERVAL_S", cls.restart_check_interval_s, minimum=0.01
            ),
            engine=env_str("ENGINE", cls.engine),
            trace_content=env_bool("TRACE_CONTENT", cls.trace_content),
            deep_health_interval_s=env_float(
                "DEEP_HEALTH_INTERVAL_S", cls.deep_health_interval_s, minimum=0.0
            ),
            deep_health_timeout_s=env_float("DEEP_HEALTH_TIMEOUT_S", cls.deep_health_timeout_s, minimum=0.1),
        )
