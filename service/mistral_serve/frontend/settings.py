"""Every frontend setting, read from the environment in one place."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

from mistral_serve.common.env import env_float, env_int, env_opt_str, env_str


@dataclass(frozen=True)
class FrontendSettings:
    # redis://host:port/db, or rediss:// for TLS.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Overrides a password in the URL; mounted from a Secret in Kubernetes.
    redis_password: str | None = None
    # Model pool whose request stream this frontend feeds.
    pool: str = "default"
    grpc_host: str = "[::]"
    # 0 picks a free port (tests).
    grpc_port: int = 50051
    # Admission bound: queued + running requests of the pool before RESOURCE_EXHAUSTED.
    max_backlog: int = 256
    # What RetryInfo tells a refused caller to wait.
    retry_after_s: float = 1.0
    # Deadline applied when the caller sets none.
    default_deadline_s: float = 600.0
    # How long a request's events stay in Redis after its last write.
    event_ttl_s: int = 600
    # Time open streams get to finish after SIGTERM.
    drain_grace_s: float = 30.0
    # Largest request message accepted; sized for 10 images of a few MB each.
    max_receive_message_bytes: int = 64 * 1024 * 1024
    # Served model's name, context and image limit, as GetModelInfo answers them.
    model_name: str = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    context_length: int = 131072
    max_images_per_prompt: int = 10
    # tekken.json of the served model, for CountTokens; None answers FAILED_PRECONDITION.
    tokenizer_path: str | None = None
    # How often readiness checks Redis.
    health_interval_s: float = 1.0
    # text or json.
    log_format: str = "text"
    # Names this process's wake stream; unique per process.
    instance_id: str = field(default_factory=lambda: f"{os.uname().nodename}-{uuid.uuid4().hex[:8]}")

    @classmethod
    def from_env(cls) -> FrontendSettings:
        return cls(
            redis_url=env_str("REDIS_URL", cls.redis_url),
            redis_password=env_opt_str("REDIS_PASSWORD"),
            pool=env_str("POOL", cls.pool),
            grpc_host=env_str("GRPC_HOST", cls.grpc_host),
            grpc_port=env_int("GRPC_PORT", cls.grpc_port, minimum=0),
            max_backlog=env_int("MAX_BACKLOG", cls.max_backlog, minimum=1),
            retry_after_s=env_float("RETRY_AFTER_S", cls.retry_after_s, minimum=0.0),
            default_deadline_s=env_float("DEFAULT_DEADLINE_S", cls.default_deadline_s, minimum=0.001),
            event_ttl_s=env_int("EVENT_TTL_S", cls.event_ttl_s, minimum=1),
            drain_grace_s=env_float("DRAIN_GRACE_S", cls.drain_grace_s, minimum=0.0),
            max_receive_message_bytes=env_int(
                "MAX_RECEIVE_MESSAGE_BYTES", cls.max_receive_message_bytes, minimum=1024
            ),
            model_name=env_str("MODEL", cls.model_name),
            context_length=env_int("MAX_MODEL_LEN", cls.context_length, minimum=1),
            max_images_per_prompt=env_int("MAX_IMAGES_PER_PROMPT", cls.max_images_per_prompt, minimum=0),
            tokenizer_path=env_opt_str("TOKENIZER"),
            health_interval_s=env_float("HEALTH_INTERVAL_S", cls.health_interval_s, minimum=0.05),
            log_format=env_str("LOG_FORMAT", cls.log_format),
        )
