"""Builds the frontend's grpc.aio server and runs it until SIGTERM, then drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from dataclasses import dataclass

import grpc
import redis.asyncio as redis
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from mistral_serve.common.ports import report_ports
from mistral_serve.common.redis_client import connect, refuse_evicting_redis
from mistral_serve.common.telemetry import MetricsServer, get_tracer, serve_metrics
from mistral_serve.v1 import chat_pb2_grpc

from .auth import AuthInterceptor, KeyStore
from .decoding import DecodeGuard
from .fanout import EventFanout
from .health import READINESS_SERVICE, FrontendHealth
from .idempotency import Idempotency
from .image_urls import FetchPolicy, ImageFetcher
from .metrics import FrontendMetrics, sample_queue
from .openai_http.app import HttpDoor, start_http
from .pipeline import ChatPipeline, TokenCounter
from .queue import RequestQueue
from .servicer import ChatServicer
from .settings import FrontendSettings
from .tracing import ServerTelemetry
from .validation import Limits

log = logging.getLogger(__name__)


@dataclass
class Frontend:
    """A started frontend: its server, the port it listens on, and its background tasks."""

    settings: FrontendSettings
    server: grpc.aio.Server
    port: int
    redis: redis.Redis
    health: FrontendHealth
    fanout: EventFanout
    tasks: list[asyncio.Task[None]]
    # Plain-text health-only server, when TLS is on and a health port is set.
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    fetcher: ImageFetcher | None = None
    metrics: FrontendMetrics | None = None
    # The /metrics endpoint, when a metrics port is set; its port is the one bound (for port 0).
    metrics_server: MetricsServer | None = None
    # The OpenAI-compatible HTTP door, when an HTTP port is set, and the port it bound.
    http_runner: web.AppRunner | None = None
    http_port: int | None = None

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: readiness NOT_SERVING, no new RPCs, open streams get `grace_s` to finish."""
        await self.health.drain()
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        # Both doors drain at once; open HTTP streams get the setting's grace.
        http = self.http_runner.cleanup() if self.http_runner is not None else asyncio.sleep(0)
        await asyncio.gather(self.server.stop(grace), http)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.fetcher is not None:
            await self.fetcher.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.redis.aclose()
        if self.metrics_server is not None:
            self.metrics_server.stop()


async def start_frontend(
    settings: FrontendSettings,
    token_counter: TokenCounter | None = None,
    *,
    tracer_provider: trace.TracerProvider | None = None,
) -> Frontend:
    """Start a frontend; spans go to `tracer_provider` (tests), else to the process's global provider."""
    client = connect(settings.redis_connection)
    await refuse_evicting_redis(client)
    metrics = FrontendMetrics(settings.pool)
    tracer = get_tracer(tracer_provider)
    fanout = EventFanout(
        client, settings.instance_id, pool=settings.pool, detach_grace_s=settings.detach_grace_s
    )
    queue = RequestQueue(
        client,
        pool=settings.pool,
        max_backlog=settings.max_backlog,
        retry_after_s=settings.retry_after_s,
        frontend_id=settings.instance_id,
        cancel_ttl_s=settings.event_ttl_s,
        tracer=tracer,
        metrics=metrics,
        detach_grace_s=settings.detach_grace_s,
        replica_wait=settings.replica_wait,
    )
    health = FrontendHealth(client, settings.health_interval_s)
    auth = auth_interceptor(settings)
    server = grpc.aio.server(
        interceptors=[
            telemetry_interceptor(tracer, metrics),
            *([auth] if auth.enabled else []),  # with auth off, not even a pass-through on every call
            DecodeGuard((f"/{READINESS_SERVICE}/",)),
        ],
        options=[
            # On purpose: the whole request, images included, is held in memory and stored in Redis.
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    fetcher = image_fetcher(settings)
    idempotency = Idempotency(client, pool=settings.pool, ttl_s=settings.idempotency_ttl_s)
    pipeline = ChatPipeline(settings, queue, fanout, token_counter, fetcher=fetcher, idempotency=idempotency)
    chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(pipeline), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        [
            READINESS_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    credentials = server_credentials(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    health_server, health_port = None, None
    if credentials is not None and settings.health_port is not None:
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health.servicer, health_server)
        health_port = health_server.add_insecure_port(f"{settings.grpc_host}:{settings.health_port}")
    await health.start()
    await server.start()
    http_runner, http_port = None, None
    if settings.http_port is not None:
        door = HttpDoor(pipeline, settings, auth, health, tracer, metrics)
        http_runner, http_port = await start_http(door, settings, settings.http_port)
    if health_server is not None:
        await health_server.start()
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(fanout.run()),
        loop.create_task(health.run()),
        loop.create_task(sample_queue(client, metrics, settings.metrics_sample_interval_s)),
    ]
    metrics_server = None
    if settings.metrics_port is not None:
        metrics_server = serve_metrics(metrics.registry, settings.metrics_host, settings.metrics_port)
    log.info(
        "frontend %s listening on port %d (pool %s; TLS %s, client certificates %s, API keys %s, "
        "image URLs %s)",
        settings.instance_id,
        port,
        settings.pool,
        "on" if credentials else "off",
        "required" if settings.tls_client_ca_file else "off",
        "required" if auth.keys_required() else "listed for quotas" if settings.api_keys_file else "off",
        "on" if fetcher else "off",
    )
    if (settings.api_keys_file or settings.api_keys) and credentials is None:
        log.warning("API keys travel in plain text: set MISTRAL_SERVE_TLS_CERT_FILE/KEY_FILE or use a mesh")
    return Frontend(
        settings,
        server,
        port,
        client,
        health,
        fanout,
        tasks,
        health_server,
        health_port,
        fetcher,
        metrics,
        metrics_server,
        http_runner,
        http_port,
    )


def telemetry_interceptor(tracer: trace.Tracer, metrics: FrontendMetrics) -> ServerTelemetry:
    """SERVER spans and request metrics for every RPC but health checks and reflection."""
    excluded = (
        f"/{health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/",
        f"/{reflection.SERVICE_NAME}/",
    )
    return ServerTelemetry(tracer, metrics, excluded_prefixes=excluded)


def auth_interceptor(settings: FrontendSettings) -> AuthInterceptor:
    """Keys when a keys file or list is configured (even an empty one: then every call is refused)."""
    keys = None
    if settings.api_keys_file or settings.api_keys:
        keys = KeyStore(settings.api_keys, settings.api_keys_file, default_quota=settings.default_quota)
    return AuthInterceptor(
        keys,
        mtls=settings.tls_client_ca_file is not None,
        allowed_client_names=settings.tls_allowed_client_names,
        caller_header=settings.caller_header,
    )


def server_credentials(settings: FrontendSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_enabled:
        return None
    assert settings.tls_cert_file and settings.tls_key_file
    with open(settings.tls_key_file, "rb") as key, open(settings.tls_cert_file, "rb") as cert:
        pair = (key.read(), cert.read())
    client_ca = None
    if settings.tls_client_ca_file:
        with open(settings.tls_client_ca_file, "rb") as ca:
            client_ca = ca.read()
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def image_fetcher(settings: FrontendSettings) -> ImageFetcher | None:
    if not settings.image_urls_enabled:
        return None
    return ImageFetcher(
        FetchPolicy(
            allowed_hosts=settings.image_url_allowed_hosts,
            allow_http=settings.image_url_allow_http,
            allow_private=settings.image_url_allow_private,
            timeout_s=settings.image_url_timeout_s,
            max_redirects=settings.image_url_max_redirects,
            limits=Limits.from_settings(settings).image,
        ),
        ssl=ssl.create_default_context(cafile=settings.image_url_ca_file)
        if settings.image_url_ca_file
        else True,
    )


async def serve(settings: FrontendSettings, token_counter: TokenCounter | None = None) -> None:
    frontend = await start_frontend(settings, token_counter)
    report_ports(
        grpc=frontend.port,
        http=frontend.http_port,
        health=frontend.health_port,
        metrics=frontend.metrics_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: open streams get %.0fs", settings.drain_grace_s)
    await frontend.stop()
