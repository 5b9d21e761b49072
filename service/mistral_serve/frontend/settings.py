"""Every frontend setting, read from the environment in one place."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

from mistral_serve.common.env import (
    SettingError,
    env_bool,
    env_float,
    env_int,
    env_opt_str,
    env_port_or_off,
    env_str,
)
from mistral_serve.common.quota import UNLIMITED, Quota
from mistral_serve.common.settings import SharedSettings

from .callers import parse_default_quota


@dataclass(frozen=True)
class FrontendSettings(SharedSettings):
    """The frontend's settings; those it shares with the worker are `SharedSettings`' fields."""

    grpc_host: str = "[::]"
    # 0 picks a free port (tests).
    grpc_port: int = 50051
    # OpenAI-compatible HTTP door (/v1/chat/completions) on grpc_host; 0 picks a free port; "off" none.
    http_port: int | None = 8000
    # Admission bound: queued + running requests of the pool before RESOURCE_EXHAUSTED.
    max_backlog: int = 256
    # What RetryInfo tells a refused caller to wait.
    retry_after_s: float = 1.0
    # Deadline applied when the caller sets none.
    default_deadline_s: float = 600.0
    # Largest request message gRPC accepts, and the most image bytes one queued request may carry
    # (it is stored in Redis). Larger messages are refused by gRPC itself (RESOURCE_EXHAUSTED).
    max_receive_message_bytes: int = 64 * 1024 * 1024
    # Other names the HTTP door's `model` field may give the served model (comma-separated).
    model_aliases: tuple[str, ...] = ()
    # tekken.json of the served model, for CountTokens; None answers FAILED_PRECONDITION.
    tokenizer_path: str | None = None
    # A request without a SYSTEM message gets the model's SYSTEM_PROMPT.txt, as the model card
    # advises (vLLM injects none); a request's `default_system_prompt` overrides this.
    default_system_prompt: bool = True
    # Largest encoded image accepted (bytes, data: URL payload after base64, or a fetched URL's body).
    max_image_bytes: int = 10 * 1024 * 1024
    # Longest image side and most pixels accepted, read from the image header before any decode.
    max_image_side_px: int = 10000
    max_image_pixels: int = 50_000_000
    # Fetch `https://` image URLs at the front door; off means only inline bytes and data: URLs.
    image_urls_enabled: bool = False
    # Hosts image URLs may name (exact, or `*.example.com` for subdomains); empty refuses all.
    image_url_allowed_hosts: tuple[str, ...] = ()
    # Also accept plain `http://` image URLs (tests, trusted in-cluster hosts).
    image_url_allow_http: bool = False
    # Accept hosts that resolve to loopback/private/link-local addresses (tests only: SSRF guard off).
    image_url_allow_private: bool = False
    # Time limit of one image download, connect to last byte.
    image_url_timeout_s: float = 10.0
    # Redirects followed per image URL; only to the same host.
    image_url_max_redirects: int = 3
    # PEM bundle of the CAs that https image URLs are verified against, in place of the system's
    # (image hosts behind a private CA); unset: the system's CAs.
    image_url_ca_file: str | None = None
    # Stop sequences: how many, and how long each (characters).
    max_stop_sequences: int = 16
    max_stop_sequence_chars: int = 256
    # Longest client_request_id accepted (characters).
    max_client_request_id_chars: int = 128
    # SHA-256 hex digests of accepted API keys, one a line (`#` comments); auth is off with no keys.
    api_keys_file: str | None = None
    # The same digests, comma-separated, for an env-only setup; merged with the file's.
    api_keys: tuple[str, ...] = ()
    # Quota of callers the keys file does not list, and the base of those it lists
    # (`rps=5 tpm=200000 inflight=8 weight=1`, each optional; empty: no limit). See callers.py.
    default_quota: Quota = UNLIMITED
    # A header that names the caller (`mesh:<value>`), set by a mesh that authenticates callers and
    # strips it from outside traffic; unset: no such header is trusted.
    caller_header: str | None = None
    # Server certificate and key (PEM): TLS on when both are set.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # CA (PEM) that signs client certificates: mTLS required when set (needs TLS on).
    tls_client_ca_file: str | None = None
    # Client certificate names (CN or DNS SAN) allowed in; empty allows any cert the CA signed.
    tls_allowed_client_names: tuple[str, ...] = ()
    # Plain-text port serving only grpc.health.v1 while TLS is on (kubelet probes cannot speak TLS).
    health_port: int | None = None
    # How long a caller's client_request_id maps to its first run; capped by event_ttl_s.
    idempotency_window_s: int = 600
    # How often readiness checks Redis.
    health_interval_s: float = 1.0
    # How often the queue's depth, lag and oldest wait are sampled into the metrics.
    metrics_sample_interval_s: float = 5.0
    # Names this process's wake stream; unique per process.
    instance_id: str = field(default_factory=lambda: f"{os.uname().nodename}-{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise SettingError("MISTRAL_SERVE_TLS_CERT_FILE and MISTRAL_SERVE_TLS_KEY_FILE go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise SettingError("MISTRAL_SERVE_TLS_CLIENT_CA_FILE needs MISTRAL_SERVE_TLS_CERT_FILE/KEY_FILE")

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    @property
    def idempotency_ttl_s(self) -> int:
        # A duplicate replays the first run's events, which Redis keeps for event_ttl_s only.
        return min(self.idempotency_window_s, self.event_ttl_s)

    @classmethod
    def from_env(cls) -> FrontendSettings:
        return cls(
            **cls.shared_from_env(),
            grpc_host=env_str("GRPC_HOST", cls.grpc_host),
            grpc_port=env_int("GRPC_PORT", cls.grpc_port, minimum=0),
            http_port=env_port_or_off("HTTP_PORT", cls.http_port),
            max_backlog=env_int("MAX_BACKLOG", cls.max_backlog, minimum=1),
            retry_after_s=env_float("RETRY_AFTER_S", cls.retry_after_s, minimum=0.0),
            default_deadline_s=env_float("DEFAULT_DEADLINE_S", cls.default_deadline_s, minimum=0.001),
            max_receive_message_bytes=env_int(
                "MAX_RECEIVE_MESSAGE_BYTES", cls.max_receive_message_bytes, minimum=1024
            ),
            model_aliases=_env_list("MODEL_ALIASES"),
            tokenizer_path=env_opt_str("TOKENIZER"),
            default_system_prompt=env_bool("DEFAULT_SYSTEM_PROMPT", cls.default_system_prompt),
            max_image_bytes=env_int("MAX_IMAGE_BYTES", cls.max_image_bytes, minimum=1),
            max_image_side_px=env_int("MAX_IMAGE_SIDE_PX", cls.max_image_side_px, minimum=1),
            max_image_pixels=env_int("MAX_IMAGE_PIXELS", cls.max_image_pixels, minimum=1),
            image_urls_enabled=env_bool("IMAGE_URLS_ENABLED", cls.image_urls_enabled),
            image_url_allowed_hosts=_env_list("IMAGE_URL_ALLOWED_HOSTS"),
            image_url_allow_http=env_bool("IMAGE_URL_ALLOW_HTTP", cls.image_url_allow_http),
            image_url_allow_private=env_bool("IMAGE_URL_ALLOW_PRIVATE", cls.image_url_allow_private),
            image_url_timeout_s=env_float("IMAGE_URL_TIMEOUT_S", cls.image_url_timeout_s, minimum=0.1),
            image_url_ca_file=env_opt_str("IMAGE_URL_CA_FILE"),
            image_url_max_redirects=env_int(
                "IMAGE_URL_MAX_REDIRECTS", cls.image_url_max_redirects, minimum=0
            ),
            max_stop_sequences=env_int("MAX_STOP_SEQUENCES", cls.max_stop_sequences, minimum=0),
            max_stop_sequence_chars=env_int(
                "MAX_STOP_SEQUENCE_CHARS", cls.max_stop_sequence_chars, minimum=1
            ),
            max_client_request_id_chars=env_int(
                "MAX_CLIENT_REQUEST_ID_CHARS", cls.max_client_request_id_chars, minimum=1
            ),
            api_keys_file=env_opt_str("API_KEYS_FILE"),
            api_keys=_env_list("API_KEYS"),
            default_quota=parse_default_quota(env_opt_str("DEFAULT_QUOTA")),
            caller_header=env_opt_str("CALLER_HEADER"),
            tls_cert_file=env_opt_str("TLS_CERT_FILE"),
            tls_key_file=env_opt_str("TLS_KEY_FILE"),
            tls_client_ca_file=env_opt_str("TLS_CLIENT_CA_FILE"),
            tls_allowed_client_names=_env_list("TLS_ALLOWED_CLIENT_NAMES"),
            health_port=_env_opt_port("HEALTH_PORT"),
            idempotency_window_s=env_int("IDEMPOTENCY_WINDOW_S", cls.idempotency_window_s, minimum=1),
            health_interval_s=env_float("HEALTH_INTERVAL_S", cls.health_interval_s, minimum=0.05),
            metrics_sample_interval_s=env_float(
                "METRICS_SAMPLE_INTERVAL_S", cls.metrics_sample_interval_s, minimum=0.05
            ),
        )


def _env_list(name: str) -> tuple[str, ...]:
    raw = env_opt_str(name) or ""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _env_opt_port(name: str) -> int | None:
    if env_opt_str(name) is None:
        return None
    return env_int(name, 0, minimum=0)
