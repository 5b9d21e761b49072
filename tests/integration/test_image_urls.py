"""Image URLs: fetched at the front door under the allow-list, SSRF, redirect, size and time rules,
against a real HTTP server on 127.0.0.1 (loopback is allowed only where a test says so)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from aiohttp import web

from mistral_serve.frontend.image_urls import FetchPolicy, ImageFetcher, address_blocked
from mistral_serve.frontend.images import ImageLimits, ImageProblem
from mistral_serve.v1 import chat_pb2
from tests.integration.conftest import Stack
from tests.integration.front_door_cases import png, png_header_only, user
from tests.integration.test_errors import bad_request_fields
from tests.support.requests import events_text

IMAGE = png(56, 28)


@pytest.fixture
async def image_server() -> AsyncIterator[int]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=IMAGE, content_type="image/png")

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length to refuse up front
        await response.prepare(request)
        await response.write(IMAGE)
        for _ in range(64):
            await response.write(b"\0" * 16384)
        return response

    async def huge_dims(request: web.Request) -> web.Response:
        return web.Response(body=png_header_only(12000, 12000), content_type="image/png")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=IMAGE)

    async def redirect_same(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok.png")

    async def redirect_other(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://localhost:{request.url.port}/ok.png")

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    app = web.Application()
    for path, handler in {
        "/ok.png": ok,
        "/big.png": big,
        "/huge.png": huge_dims,
        "/slow.png": slow,
        "/same.png": redirect_same,
        "/other.png": redirect_other,
        "/missing.png": missing,
    }.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port
    await runner.cleanup()


def fetcher(**overrides: object) -> ImageFetcher:
    fields: dict[str, object] = {
        "allowed_hosts": ("127.0.0.1",),
        "allow_http": True,
        "allow_private": True,
        "timeout_s": 1.0,
        "limits": ImageLimits(max_bytes=512 * 1024),
    }
    fields.update(overrides)
    return ImageFetcher(FetchPolicy(**fields))  # type: ignore[arg-type]


async def fetch_problem(f: ImageFetcher, url: str) -> str:
    try:
        with pytest.raises(ImageProblem) as refused:
            await f.fetch(url)
    finally:
        await f.close()
    return refused.value.description


async def test_an_allowed_url_is_fetched(image_server: int) -> None:
    f = fetcher()
    try:
        fetched = await f.fetch(f"http://127.0.0.1:{image_server}/ok.png")
        assert (fetched.data, fetched.mime_type) == (IMAGE, "image/png")
        assert (fetched.width, fetched.height) == (56, 28)
        assert (await f.fetch(f"http://127.0.0.1:{image_server}/same.png")).data == IMAGE
    finally:
        await f.close()


async def test_loopback_is_refused_by_default(image_server: int) -> None:
    problem = await fetch_problem(fetcher(allow_private=False), f"http://127.0.0.1:{image_server}/ok.png")
    assert "non-public address" in problem


async def test_a_name_resolving_to_loopback_is_refused_by_default(image_server: int) -> None:
    f = fetcher(allow_private=False, allowed_hosts=("localhost",))
    problem = await fetch_problem(f, f"http://localhost:{image_server}/ok.png")
    assert "non-public" in problem


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("100.64.0.1", True),
        ("::1", True),
        ("fe80::1", True),
        ("fd00::1", True),
        ("::ffff:127.0.0.1", True),
        ("224.0.0.1", True),
        ("0.0.0.0", True),
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
    ],
)
def test_non_public_addresses_are_blocked(address: str, blocked: bool) -> None:
    assert address_blocked(address) is blocked


async def test_a_redirect_to_another_host_is_refused(image_server: int) -> None:
    f = fetcher(allowed_hosts=("127.0.0.1", "localhost"))
    problem = await fetch_problem(f, f"http://127.0.0.1:{image_server}/other.png")
    assert "another host" in problem


async def test_a_body_over_the_cap_stops_while_streaming(image_server: int) -> None:
    problem = await fetch_problem(fetcher(), f"http://127.0.0.1:{image_server}/big.png")
    assert "over 524288 bytes" in problem


async def test_dimensions_are_refused_from_the_header(image_server: int) -> None:
    problem = await fetch_problem(fetcher(), f"http://127.0.0.1:{image_server}/huge.png")
    assert "12000x12000" in problem


async def test_a_slow_server_hits_the_time_limit(image_server: int) -> None:
    problem = await fetch_problem(fetcher(timeout_s=0.3), f"http://127.0.0.1:{image_server}/slow.png")
    assert "longer than 0.3s" in problem


async def test_http_errors_and_plain_http_are_named(image_server: int) -> None:
    assert "HTTP 404" in await fetch_problem(fetcher(), f"http://127.0.0.1:{image_server}/missing.png")
    problem = await fetch_problem(fetcher(allow_http=False), f"http://127.0.0.1:{image_server}/ok.png")
    assert "scheme must be https" in problem


async def test_a_url_image_runs_end_to_end_and_refusals_name_the_part(
    stack: Stack, image_server: int
) -> None:
    frontend = await stack.frontend(
        image_urls_enabled=True,
        image_url_allowed_hosts=("127.0.0.1",),
        image_url_allow_http=True,
        image_url_allow_private=True,
    )
    await stack.worker()
    client = stack.client(frontend)
    good = chat_pb2.ChatRequest(
        messages=[
            user(
                chat_pb2.ContentPart(text="describe"),
                chat_pb2.ContentPart(image_url=f"http://127.0.0.1:{image_server}/ok.png"),
            )
        ]
    )
    events = [e async for e in client.stream(good)]
    assert events[-1].WhichOneof("event") == "finished"
    assert events_text(events).startswith("describe")

    bad = chat_pb2.ChatRequest()
    bad.CopyFrom(good)
    bad.messages[0].content[1].image_url = f"http://127.0.0.1:{image_server}/missing.png"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.chat(bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["messages[0].content[1].image_url"]
