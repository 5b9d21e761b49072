"""Every worker setting, read from the environment in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mistral_serve.common.env import env_bool, env_float, env_int, env_opt_str, env_port_or_off, env_str


@dataclass(frozen=True)
class WorkerSettings:
    # redis://host:port/db, or rediss:// for TLS.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Overrides a password in the URL; mounted from a Secret in Kubernetes.
    redis_password: str | None = None
    # Model pool whose request stream this worker serves.
    pool: str = "default"
    # Consumer name in the pool's group; unique per worker process.
    consumer_name: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    # Jobs in flight at once: the engine batches them (continuous batching).
    max_inflight: int = 64
    # Deltas of a request are gathered this long before one write (the first token goes at once).
    flush_interval_ms: float = 5.0
    # ...or until this many deltas of one request wait.
    flush_max_events: int = 64
    # How long a request's events stay in Redis after its last write.
    event_ttl_s: int = 600
    # After SIGTERM, in-flight jobs get this long to finish; the rest are left for other workers.
    drain_grace_s: float = 120.0
    # gRPC health server: "" answers liveness, "mistral_serve.worker" readiness.
    health_host: str = "[::]"
    health_port: int = 50052
    # A running job's lease: refreshed every third of it; a job whose lease lapsed (its worker was
    # lost) is claimed by another worker, which resumes it after the tokens already streamed.
    lease_ms: int = 15000
    # Runs of one request (first run plus resumes) before it ends with an error.
    max_attempts: int = 3
    # How often running requests are checked for a caller still attached (see DETACH_GRACE_S).
    attach_check_interval_s: float = 1.0
    # How one XREADGROUP waits for new requests.
    block_ms: int = 1000
    # "vllm", or "package.module:factory" for a callable returning an Engine.
    engine: str = "vllm"
    # text or json.
    log_format: str = "text"
    # Served model's name, as spans and metrics report it (gen_ai.request.model).
    model_name: str = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    # Prometheus /metrics port (0 picks a free one; None, "off" in the environment, serves none).
    metrics_port: int | None = 9091
    metrics_host: str = "0.0.0.0"
    # Record message contents (prompt and output text) on generation spans; off: never recorded.
    trace_content: bool = False
    # Deep health: a one-token generation this often, answered as "mistral_serve.worker.deep"; 0 is off.
    deep_health_interval_s: float = 0.0
    # How long one deep check may take before it counts as failed.
    deep_health_timeout_s: float = 30.0

    @classmethod
    def from_env(cls) -> WorkerSettings:
        return cls(
            redis_url=env_str("REDIS_URL", cls.redis_url),
            redis_password=env_opt_str("REDIS_PASSWORD"),
            pool=env_str("POOL", cls.pool),
            consumer_name=env_opt_str("WORKER_NAME") or f"{os.uname().nodename}-{os.getpid()}",
            max_inflight=env_int("WORKER_MAX_INFLIGHT", cls.max_inflight, minimum=1),
            flush_interval_ms=env_float("FLUSH_INTERVAL_MS", cls.flush_interval_ms, minimum=0.0),
            flush_max_events=env_int("FLUSH_MAX_EVENTS", cls.flush_max_events, minimum=1),
            event_ttl_s=env_int("EVENT_TTL_S", cls.event_ttl_s, minimum=1),
            drain_grace_s=env_float("DRAIN_GRACE_S", cls.drain_grace_s, minimum=0.0),
            health_host=env_str("HEALTH_HOST", cls.health_host),
            health_port=env_int("HEALTH_PORT", cls.health_port, minimum=0),
            block_ms=env_int("BLOCK_MS", cls.block_ms, minimum=1),
            lease_ms=env_int("LEASE_MS", cls.lease_ms, minimum=100),
            max_attempts=env_int("MAX_ATTEMPTS", cls.max_attempts, minimum=1),
            attach_check_interval_s=env_float(
                "ATTACH_CHECK_INTERVAL_S", cls.attach_check_interval_s, minimum=0.01
            ),
            engine=env_str("ENGINE", cls.engine),
            log_format=env_str("LOG_FORMAT", cls.log_format),
            model_name=env_str("MODEL", cls.model_name),
            metrics_port=env_port_or_off("METRICS_PORT", cls.metrics_port),
            metrics_host=env_str("METRICS_HOST", cls.metrics_host),
            trace_content=env_bool("TRACE_CONTENT", cls.trace_content),
            deep_health_interval_s=env_float(
                "DEEP_HEALTH_INTERVAL_S", cls.deep_health_interval_s, minimum=0.0
            ),
            deep_health_timeout_s=env_float("DEEP_HEALTH_TIMEOUT_S", cls.deep_health_timeout_s, minimum=0.1),
        )
