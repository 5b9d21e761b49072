"""The OpenAI-compatible HTTP door: aiohttp handlers that translate to and from the request pipeline.

It runs in the frontend's process and event loop, on the same pipeline, fan-out reader and Redis
client as the gRPC door; only the wire format differs. Routes:

- `POST /v1/chat/completions`: a `chat.completion`, or with `stream: true` SSE `chat.completion.chunk`s
  ending in `data: [DONE]`. With a `Last-Event-ID` header it continues that stream (any frontend,
  owner only) after that event instead of starting a new request.
- `POST /v1/chat/completions/{id}/cancel`, `GET /v1/models`.
- `GET /health/live`, `GET /health/ready`: probes, no key needed.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from opentelemetry import trace

from mistral_serve.v1 import chat_pb2

from ..auth import ANONYMOUS, AuthInterceptor, Caller
from ..errors import FieldViolation, InvalidRequest, ServiceError
from ..health import FrontendHealth
from ..metrics import FrontendMetrics
from ..pipeline import ChatPipeline, EventStream
from ..settings import FrontendSettings
from .errors import (
    BodyTooLarge,
    HttpError,
    ModelNotFound,
    code_name,
    error_body,
    from_error_event,
    from_service_error,
    internal,
)
from .requests import OpenAINames, parse_body, to_chat_completion
from .responses import ChunkWriter, completion, completion_id, dumps, parse_event_id
from .telemetry import HttpCall

log = logging.getLogger(__name__)
CHAT = "ChatCompletions"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class HttpDoor:
    def __init__(
        self,
        pipeline: ChatPipeline,
        settings: FrontendSettings,
        auth: AuthInterceptor,
        health: FrontendHealth,
        tracer: trace.Tracer,
        metrics: FrontendMetrics,
    ) -> None:
        self._pipeline = pipeline
        self._settings = settings
        self._auth = auth
        self._health = health
        self._tracer = tracer
        self._metrics = metrics
        self._models = (settings.model_name, *settings.model_aliases)

    def application(self) -> web.Application:
        app = web.Application(
            client_max_size=self._settings.max_receive_message_bytes, middlewares=[openai_shaped_errors]
        )
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/chat/completions/{request_id}/cancel", self.cancel)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health/live", self.live)
        app.router.add_get("/health/ready", self.ready)
        return app

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        call = HttpCall(self._tracer, self._metrics, request, CHAT)
        names: OpenAINames | None = None
        try:
            with trace.use_span(call.span, end_on_exit=False, record_exception=False):
                caller = self._caller(request)
                body = parse_body(await _read(request, self._settings.max_receive_message_bytes))
                resume = request.headers.get("Last-Event-ID")
                if resume is not None:
                    names = OpenAINames()
                    return await self._resume(request, call, caller, body, resume)
                parsed = to_chat_completion(
                    body,
                    idempotency_key=request.headers.get("Idempotency-Key"),
                    context_length=self._settings.context_length,
                )
                model = self._model(parsed.model)
                names = parsed.names
                deadline = self._pipeline.deadline(None)
                events = await self._pipeline.chat(parsed.request, caller=caller, deadline=deadline)
                if parsed.stream:
                    return await self._stream(request, call, events, model, parsed.include_usage)
                return await self._gather(call, events, model)
        except ServiceError as error:
            return _refuse(call, from_service_error(error, names), error.code.name)
        except Exception as exc:
            return _refuse(call, internal(exc), "INTERNAL")
        except BaseException:  # the caller went away: the request runs on for the detach grace
            call.end(499, "CANCELLED")
            raise

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        call = HttpCall(self._tracer, self._metrics, request, "CancelChatCompletion")
        try:
            caller = self._caller(request)
            request_id = request.match_info["request_id"].removeprefix("chatcmpl-")
            await self._pipeline.cancel(request_id, caller=caller.identity)
        except ServiceError as error:
            return _refuse(call, from_service_error(error), error.code.name)
        call.end(200, "OK")
        return _json({"id": completion_id(request_id), "object": "chat.completion.cancel", "cancelled": True})

    async def models(self, request: web.Request) -> web.StreamResponse:
        try:
            self._caller(request)
        except ServiceError as error:
            return _json_error(from_service_error(error))
        info = self._pipeline.model_info()
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "mistralai",
                "root": info.model,
                "max_model_len": info.context_length,
                # Whether a chat without a system message gets the model's own (vLLM injects none).
                "default_system_prompt": info.default_system_prompt,
            }
            for name in self._models
        ]
        return _json({"object": "list", "data": data})

    async def live(self, request: web.Request) -> web.StreamResponse:
        return _json({"status": "ok"})

    async def ready(self, request: web.Request) -> web.StreamResponse:
        if self._health.ready:
            return _json({"status": "ready"})
        return _json({"status": "not ready"}, status=503)

    def _caller(self, request: web.Request) -> Caller:
        if not self._auth.enabled:
            return ANONYMOUS
        header = self._auth.caller_header
        return self._auth.authenticate(
            request.headers.get("Authorization"),
            _auth_context(request),
            request.headers.get(header) if header else None,
        )

    def _model(self, asked: str | None) -> str:
        if asked is None:
            return self._settings.model_name
        if asked not in self._models:
            raise ModelNotFound(
                f"the model {asked!r} does not exist here; this service serves {self._settings.model_name!r}"
            )
        return asked

    async def _resume(
        self, request: web.Request, call: HttpCall, caller: Caller, body: Any, last_event_id: str
    ) -> web.StreamResponse:
        """The HTTP form of reattach: the stream after `Last-Event-ID`, without its first chunk again."""
        where = parse_event_id(last_event_id)
        if where is None:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "last_sequence", "must be the `id:` of an event of one of this service's streams"
                    )
                ]
            )
        asked = body.get("model") if isinstance(body, dict) else None
        model = self._model(asked if isinstance(asked, str) else None)
        options = body.get("stream_options") if isinstance(body, dict) else None
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        deadline = self._pipeline.deadline(None)
        events = await self._pipeline.reattach(*where, caller=caller.identity, deadline=deadline)
        return await self._stream(request, call, events, model, include_usage, resumed=True)

    async def _stream(
        self,
        request: web.Request,
        call: HttpCall,
        events: EventStream,
        model: str,
        include_usage: bool,
        *,
        resumed: bool = False,
    ) -> web.StreamResponse:
        writer = ChunkWriter(events.request_id, model, int(time.time()), include_usage)
        response = web.StreamResponse(headers=SSE_HEADERS)
        with contextlib.closing(events):
            try:
                await self._write_events(response, request, call, events, writer, resumed)
            except ConnectionResetError:  # the caller went away: the request runs on for the detach grace
                call.end(499, "CANCELLED")
                return response
        await response.write_eof()
        call.end(200, writer.outcome)
        return response

    async def _write_events(
        self,
        response: web.StreamResponse,
        request: web.Request,
        call: HttpCall,
        events: EventStream,
        writer: ChunkWriter,
        resumed: bool,
    ) -> None:
        await response.prepare(request)
        async for event in events:
            kind = event.WhichOneof("event")
            if kind == "delta":
                call.delta()
                chunk = writer.delta(event.delta)
            elif kind == "started":
                call.started(event.started.request_id)
                if resumed:
                    continue
                chunk = writer.started()
            elif kind == "finished":
                chunk = writer.finished(event.finished)
            else:
                chunk = writer.error(event.error)
            await response.write(chunk)

    async def _gather(self, call: HttpCall, events: EventStream, model: str) -> web.StreamResponse:
        text: list[str] = []
        token_logprobs: list[chat_pb2.TokenLogprob] = []
        created = int(time.time())
        with contextlib.closing(events):
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    text.append(event.delta.text)
                    token_logprobs.extend(event.delta.logprobs)
                elif kind == "started":
                    call.started(event.started.request_id)
                elif kind == "finished":
                    call.end(200, "OK")
                    answer = completion(
                        events.request_id, model, created, "".join(text), event.finished, token_logprobs
                    )
                    return _json(answer)
                else:
                    return _refuse(call, from_error_event(event.error), code_name(event.error.code))
        raise AssertionError("an event stream ends with its terminal event")  # pragma: no cover


@web.middleware
async def openai_shaped_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, wrong method) in OpenAI's error shape too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return _json(error_body(exc.reason, kind), status=exc.status, headers={"x-should-retry": "false"})


async def _read(request: web.Request, limit: int) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(f"the body is over {limit} bytes, the most this service accepts") from exc


def _refuse(call: HttpCall, error: HttpError, code: str) -> web.StreamResponse:
    call.end(error.status, code, str(error.body["error"]["message"]))
    return _json_error(error)


def _json_error(error: HttpError) -> web.StreamResponse:
    return _json(error.body, status=error.status, headers=error.headers)


def _json(value: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(value), status=status, headers=headers, content_type="application/json")


def _auth_context(request: web.Request) -> dict[str, list[bytes]]:
    """The peer's client-certificate names, as gRPC's auth context holds them (mTLS)."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return {}
    common = [v.encode() for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    alt = [v.encode() for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    return {"x509_common_name": common, "x509_subject_alternative_name": alt}


def ssl_context(settings: FrontendSettings) -> ssl.SSLContext | None:
    """The gRPC port's TLS (and mTLS) for the HTTP port too."""
    if not settings.tls_enabled:
        return None
    assert settings.tls_cert_file and settings.tls_key_file
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file:
        context.load_verify_locations(settings.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_http(door: HttpDoor, settings: FrontendSettings, port: int) -> tuple[web.AppRunner, int]:
    """Serve `door` on the gRPC host and `port` (0: a free one); the runner and the bound port."""
    # A caller that disconnects cancels its handler: its request then gets the detach grace.
    runner = web.AppRunner(
        door.application(),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=settings.drain_grace_s,
    )
    await runner.setup()
    host = settings.grpc_host.strip("[]")
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context(settings), reuse_port=False)
    await site.start()
    bound = int(runner.addresses[0][1])
    log.info("http listening on %s:%d", host, bound)
    return runner, bound
