"""The settings both processes read, from the same variables: one definition for frontend and worker.

`FrontendSettings` and `WorkerSettings` extend `SharedSettings`; a field they share has its name,
default and variable here (a process may give it another default, e.g. its own metrics port).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from mistral_serve.common.contract import (
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_MAX_IMAGES_PER_PROMPT,
    DEFAULT_MODEL,
)
from mistral_serve.common.env import env_float, env_int, env_opt_str, env_port_or_off, env_str
from mistral_serve.common.redis_client import MODES, STANDALONE, RedisConnection, ReplicaWait


def served_name(model: str, override: str | None) -> str:
    """The model's name as callers, spans and metrics see it: `override`, the hub id, or the folder's
    name when `model` is a local path (a path says where the weights are, not what the model is)."""
    if override:
        return override
    looks_local = model.startswith(("/", "./", "../", "~"))
    return PurePath(model.rstrip("/")).name if looks_local else model


def _redis_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"MISTRAL_SERVE_REDIS_MODE must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


@dataclass(frozen=True)
class SharedSettings:
    # redis://host:port/db, or rediss:// for TLS.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Overrides a password in the URL; mounted from a Secret in Kubernetes.
    redis_password: str | None = None
    # standalone, sentinel or cluster (redis_client.MODES); see docs/redis.md.
    redis_mode: str = STANDALONE
    # rediss:// only: CA bundle of the server's certificate (unset: system CAs), client certificate and key.
    redis_tls_ca_file: str | None = None
    redis_tls_cert_file: str | None = None
    redis_tls_key_file: str | None = None
    # Sentinel mode: "host:port" of each sentinel (comma-separated in the environment), the primary's
    # name there, and the sentinels' own password.
    redis_sentinels: tuple[str, ...] = ()
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: str | None = None
    # WAIT for this many replicas after an admission and after a terminal event (0: off), up to the
    # timeout; see docs/redis.md.
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 200
    # Model pool whose request streams this process feeds or serves.
    pool: str = "default"
    # How long a request's events stay in Redis after its last write.
    event_ttl_s: int = 600
    # After SIGTERM, open work gets this long to finish.
    drain_grace_s: float = 30.0
    # A request nobody follows runs on this long for its caller to reattach, then is cancelled.
    # Frontends renew the attached key every third of it; workers cancel once it was missing that long.
    detach_grace_s: float = 30.0
    # text or json.
    log_format: str = "text"
    # The model: a hub id or a local folder in Mistral's layout (MISTRAL_SERVE_MODEL).
    model_name: str = DEFAULT_MODEL
    # Its name as GetModelInfo, spans and metrics report it; unset: see `served_name`.
    served_model_name_override: str | None = None
    # Context length, prompt + output (vLLM's max_model_len), and images per prompt.
    context_length: int = DEFAULT_CONTEXT_LENGTH
    max_images_per_prompt: int = DEFAULT_MAX_IMAGES_PER_PROMPT
    # Prometheus /metrics port (0 picks a free one; None, "off" in the environment, serves none).
    metrics_port: int | None = 9090
    metrics_host: str = "0.0.0.0"

    @property
    def redis_connection(self) -> RedisConnection:
        """The Redis settings as the one block `redis_client.connect` takes."""
        return RedisConnection(
            url=self.redis_url,
            password=self.redis_password,
            mode=self.redis_mode,
            tls_ca_file=self.redis_tls_ca_file,
            tls_cert_file=self.redis_tls_cert_file,
            tls_key_file=self.redis_tls_key_file,
            sentinels=self.redis_sentinels,
            sentinel_master=self.redis_sentinel_master,
            sentinel_password=self.redis_sentinel_password,
        )

    @property
    def replica_wait(self) -> ReplicaWait:
        return ReplicaWait(self.redis_wait_replicas, self.redis_wait_timeout_ms)

    @property
    def served_model_name(self) -> str:
        return served_name(self.model_name, self.served_model_name_override)

    @classmethod
    def shared_from_env(cls) -> dict[str, Any]:
        """The shared fields' values from the environment, with `cls`'s defaults."""
        return {
            "redis_url": env_str("REDIS_URL", cls.redis_url),
            "redis_password": env_opt_str("REDIS_PASSWORD"),
            "redis_mode": _redis_mode(env_str("REDIS_MODE", cls.redis_mode)),
            "redis_tls_ca_file": env_opt_str("REDIS_TLS_CA_FILE"),
            "redis_tls_cert_file": env_opt_str("REDIS_TLS_CERT_FILE"),
            "redis_tls_key_file": env_opt_str("REDIS_TLS_KEY_FILE"),
            "redis_sentinels": tuple(
                a.strip() for a in env_str("REDIS_SENTINELS", "").split(",") if a.strip()
            ),
            "redis_sentinel_master": env_str("REDIS_SENTINEL_MASTER", cls.redis_sentinel_master),
            "redis_sentinel_password": env_opt_str("REDIS_SENTINEL_PASSWORD"),
            "redis_wait_replicas": env_int("REDIS_WAIT_REPLICAS", cls.redis_wait_replicas, minimum=0),
            "redis_wait_timeout_ms": env_int("REDIS_WAIT_TIMEOUT_MS", cls.redis_wait_timeout_ms, minimum=1),
            "pool": env_str("POOL", cls.pool),
            "event_ttl_s": env_int("EVENT_TTL_S", cls.event_ttl_s, minimum=1),
            "drain_grace_s": env_float("DRAIN_GRACE_S", cls.drain_grace_s, minimum=0.0),
            "detach_grace_s": env_float("DETACH_GRACE_S", cls.detach_grace_s, minimum=0.05),
            "log_format": env_str("LOG_FORMAT", cls.log_format),
            "model_name": env_str("MODEL", cls.model_name),
            "served_model_name_override": env_opt_str("SERVED_MODEL_NAME"),
            "context_length": env_int("MAX_MODEL_LEN", cls.context_length, minimum=16),
            "max_images_per_prompt": env_int("MAX_IMAGES_PER_PROMPT", cls.max_images_per_prompt, minimum=0),
            "metrics_port": env_port_or_off("METRICS_PORT", cls.metrics_port),
            "metrics_host": env_str("METRICS_HOST", cls.metrics_host),
        }

    @classmethod
    def from_env(cls) -> SharedSettings:
        return cls(**cls.shared_from_env())
