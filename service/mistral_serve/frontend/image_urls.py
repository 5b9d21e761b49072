"""Fetching `https://` image URLs at the front door, so workers only ever see image bytes.

Off unless `MISTRAL_SERVE_IMAGE_URLS_ENABLED`. When on, a URL is fetched only if:
- its scheme is https (http only with `IMAGE_URL_ALLOW_HTTP`) and its host is on the allow-list;
- every address its host resolves to is public: loopback, private, link-local, CGNAT, multicast and
  reserved ranges are refused (SSRF), and the connection goes to the addresses that were checked
  (the resolver is the one aiohttp connects with, so a second DNS answer cannot swap them);
- redirects stay on the same host (at most `IMAGE_URL_MAX_REDIRECTS`);
- the body stays under the byte limit while it streams (a `Content-Length` over it is refused before
  any body is read), the header's pixel dimensions pass as soon as the header has arrived, and the
  whole fetch ends within `IMAGE_URL_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from mistral_serve.v1 import chat_pb2

from .errors import FieldViolation, InvalidRequest
from .images import (
    CheckedImage,
    ImageLimits,
    ImageProblem,
    ImageTooLarge,
    check_dimensions,
    check_image,
    read_header,
    sniff_format,
)
from .validation import PartIndex, url_problem

_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
# The header of every accepted format sits in the first bytes; stop probing it after this many.
_HEADER_PROBE_LIMIT = 1024 * 1024


class BlockedAddress(OSError):
    """The host resolves to an address the service must not connect to."""


def address_blocked(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses non-public addresses."""

    def __init__(self, *, allow_private: bool, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return results
        blocked = [r["host"] for r in results if address_blocked(r["host"])]
        if blocked:
            # One bad address refuses the host: connecting to the good ones would let DNS pick the target.
            raise BlockedAddress(f"{host} resolves to a non-public address ({blocked[0]})")
        return results

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    allowed_hosts: tuple[str, ...]
    allow_http: bool = False
    allow_private: bool = False
    timeout_s: float = 10.0
    max_redirects: int = 3
    limits: ImageLimits = field(default_factory=ImageLimits)


class ImageFetcher:
    """Downloads image URLs under a FetchPolicy; one HTTP session per frontend process."""

    def __init__(self, policy: FetchPolicy, *, ssl: Any = True) -> None:
        self._policy = policy
        self._ssl = ssl
        self._session: aiohttp.ClientSession | None = None

    @property
    def limits(self) -> ImageLimits:
        return self._policy.limits

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(allow_private=self._policy.allow_private),
                use_dns_cache=False,
                ssl=self._ssl,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,  # no proxy from the environment: the checks above are about the target
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": "mistral-serve", "Accept-Encoding": "identity"},
            )
        return self._session

    async def fetch(self, url: str) -> CheckedImage:
        """The image, checked; raises ImageProblem (field "") saying why it cannot be used."""
        try:
            async with asyncio.timeout(self._policy.timeout_s):
                return await self._follow(url)
        except TimeoutError:
            raise ImageProblem(
                "", f"fetching the image took longer than {self._policy.timeout_s:g}s"
            ) from None

    async def _follow(self, url: str) -> CheckedImage:
        p = self._policy
        host = (urlsplit(url).hostname or "").lower()
        for _ in range(p.max_redirects + 1):
            problem = url_problem(url, p.allowed_hosts, allow_http=p.allow_http)
            if problem:
                raise ImageProblem("", problem)
            target = urlsplit(url)
            if (target.hostname or "").lower() != host:
                raise ImageProblem("", f"the image URL redirects to another host ({target.hostname})")
            _check_literal_address(target.hostname or "", allow_private=p.allow_private)
            try:
                async with self._client().get(url, allow_redirects=False) as response:
                    if response.status in _REDIRECTS and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if response.status != 200:
                        raise ImageProblem("", f"fetching the image answered HTTP {response.status}")
                    return await self._read_body(response)
            except aiohttp.ClientError as exc:
                raise ImageProblem("", _client_error(exc)) from exc
        raise ImageProblem("", f"the image URL redirects more than {p.max_redirects} times")

    async def _read_body(self, response: aiohttp.ClientResponse) -> CheckedImage:
        limits = self._policy.limits
        if response.content_length is not None and response.content_length > limits.max_bytes:
            raise ImageProblem(
                "", f"the image is {response.content_length} bytes; at most {limits.max_bytes} are accepted"
            )
        body = bytearray()
        size: tuple[int, int] | None = None
        async for chunk in response.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > limits.max_bytes:
                raise ImageProblem("", f"the image is over {limits.max_bytes} bytes")
            if size is None and len(body) <= _HEADER_PROBE_LIMIT:
                size = _size_once_arrived(bytes(body), limits)
        data = bytes(body)
        if size is None:
            return check_image(data, None, limits)
        mime_type = sniff_format(data)
        assert mime_type is not None  # the header was read, so the format is one of FORMATS
        return CheckedImage(data, mime_type, *size)


def _size_once_arrived(prefix: bytes, limits: ImageLimits) -> tuple[int, int] | None:
    """The image's checked size once its header has arrived; None while it has not."""
    try:
        width, height = read_header(prefix)
    except ImageTooLarge:
        raise
    except ImageProblem:
        return None
    check_dimensions(width, height, limits)
    return width, height


def _check_literal_address(host: str, *, allow_private: bool) -> None:
    # aiohttp connects to an IP literal without asking the resolver, so it is checked here.
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return
    if not allow_private and address_blocked(host):
        raise ImageProblem("", f"the image URL names a non-public address ({host})")


def _client_error(exc: aiohttp.ClientError) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, BlockedAddress):
            return f"the image URL's host is refused: {cause}"
        cause = cause.__cause__ or getattr(cause, "os_error", None)
    return f"the image could not be fetched: {exc}"


async def resolve_image_urls(
    request: chat_pb2.ChatRequest, fetcher: ImageFetcher, *, path: str = ""
) -> dict[PartIndex, CheckedImage]:
    """The images behind `request`'s http(s) image URLs, fetched and checked, by where they sit.

    Raises InvalidRequest naming every URL that cannot be used. `request` must have passed
    validation (URLs allowed, at most the image limit).
    """
    targets = [
        (i, j, part.image_url)
        for i, message in enumerate(request.messages)
        for j, part in enumerate(message.content)
        if part.WhichOneof("kind") == "image_url" and not part.image_url.startswith("data:")
    ]
    if not targets:
        return {}
    results = await asyncio.gather(*(fetcher.fetch(url) for _, _, url in targets), return_exceptions=True)
    fetched: dict[PartIndex, CheckedImage] = {}
    violations: list[FieldViolation] = []
    for (i, j, _), result in zip(targets, results, strict=True):
        if isinstance(result, ImageProblem):
            violations.append(
                FieldViolation(f"{path}messages[{i}].content[{j}].image_url", result.description)
            )
        elif isinstance(result, BaseException):
            raise result
        else:
            fetched[(i, j)] = result
    if violations:
        raise InvalidRequest(violations)
    return fetched
