"""TLS for real, with a CA this test makes: mTLS client certificates at the gRPC front door (the
handshake, then the allow-list of names), and https image URLs verified against a CA bundle setting."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from aiohttp import web

from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from tests.integration.conftest import Stack
from tests.integration.front_door_cases import png, user
from tests.integration.test_errors import bad_request_fields
from tests.support.certs import Issued, TestCA
from tests.support.requests import chat, events_text
from tests.support.scripted_engine import ScriptedEngine

IMAGE = png(40, 30)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


async def chat_over_tls(port: int, ca: TestCA, client: Issued | None) -> list[chat_pb2.ChatEvent]:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_pb2.ChatStreamRequest(request=chat("over tls", max_tokens=3))
        return [event async for event in stub.ChatStream(request, timeout=10)]


async def test_client_certificates_are_checked_in_the_handshake_then_by_name(
    stack: Stack, ca: TestCA, tmp_path: Path
) -> None:
    cert, key = ca.server().write(tmp_path, "server")
    frontend = await stack.frontend(
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        tls_client_ca_file=str(ca.write(tmp_path)),
        tls_allowed_client_names=("billing",),
    )
    await stack.worker()

    events = await chat_over_tls(frontend.port, ca, ca.client("billing"))
    assert events[-1].WhichOneof("event") == "finished"
    assert events_text(events) == "over tls w1"

    # Signed by our CA, so the handshake passes; its name is not on the list.
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await chat_over_tls(frontend.port, ca, ca.client("intruder"))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "intruder" in (denied.value.details() or "")

    # No certificate, or one from another CA: the TLS handshake itself fails.
    for stranger in (None, TestCA("another CA").client("billing")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chat_over_tls(frontend.port, ca, stranger)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    # The allowed caller is still served after the refusals.
    events = await chat_over_tls(frontend.port, ca, ca.client("billing"))
    assert events[-1].WhichOneof("event") == "finished"


@pytest.fixture
async def https_image_server(ca: TestCA, tmp_path: Path) -> AsyncIterator[int]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=IMAGE, content_type="image/png")

    app = web.Application()
    app.router.add_get("/ok.png", ok)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*ca.server().write(tmp_path, "images"))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await runner.cleanup()


def image_chat(url: str) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        messages=[user(chat_pb2.ContentPart(text="describe"), chat_pb2.ContentPart(image_url=url))]
    )


async def test_https_image_urls_are_verified_against_the_ca_bundle_setting(
    stack: Stack, ca: TestCA, https_image_server: int, tmp_path: Path
) -> None:
    url = f"https://127.0.0.1:{https_image_server}/ok.png"
    images = {
        "image_urls_enabled": True,
        "image_url_allowed_hosts": ("127.0.0.1",),
        "image_url_allow_private": True,
    }
    trusting = await stack.frontend(**images, image_url_ca_file=str(ca.write(tmp_path)))
    engine = ScriptedEngine()
    await stack.worker(engine)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{trusting.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        events = [e async for e in stub.ChatStream(chat_pb2.ChatStreamRequest(request=image_chat(url)))]
    assert events[-1].WhichOneof("event") == "finished"
    (reached,) = engine.requests
    assert reached.chat.messages[0].content[1].image.data == IMAGE  # fetched over TLS, bytes to the worker

    # Without the bundle the system's CAs do not know ours: the fetch fails, and the refusal names the part.
    default = await stack.frontend(**images)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{default.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Chat(image_chat(url), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["messages[0].content[1].image_url"]
    assert "certificate" in (refused.value.details() or "")
