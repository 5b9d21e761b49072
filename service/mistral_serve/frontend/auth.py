"""Who is calling: bearer API keys (stored as SHA-256 digests) and optional mTLS client certificates.

Auth is off when neither keys (`MISTRAL_SERVE_API_KEYS_FILE` / `MISTRAL_SERVE_API_KEYS`) nor a client CA
are configured, so tests and `make run` need nothing. Health and reflection never need credentials.
The caller's identity is put in `CALLER` for the handler (a contextvar of the RPC's task).

- UNAUTHENTICATED: no key, a malformed `authorization` header, or a key the service does not know.
- PERMISSION_DENIED: a client certificate the CA signed (so the caller is known) whose name is not
  on `MISTRAL_SERVE_TLS_ALLOWED_CLIENT_NAMES`.

With `MISTRAL_SERVE_CALLER_HEADER` set, a request carrying that header is the caller it names
(`mesh:<value>`), whatever else identified it: a mesh in front that authenticates callers sets it.
The mesh must strip the header from traffic it did not authenticate, or anyone can name themselves.
Keys-file lines also give callers their names and quotas (`callers.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any

import grpc

from mistral_serve.common.env import SettingError
from mistral_serve.common.quota import UNLIMITED, Quota

from .callers import ANONYMOUS, Caller, KeysFile, Listing, parse_keys_file
from .errors import PermissionDenied, Unauthenticated
from .gating import Context, gated

log = logging.getLogger(__name__)

# Methods anyone may call: probes and tooling must work without a key.
PUBLIC_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_DIGEST = re.compile(r"[0-9a-f]{64}")
# How often a keys file is checked for changes (a rotated Kubernetes Secret).
RELOAD_INTERVAL_S = 5.0
# A mesh header's value names the caller; anything longer or unprintable is refused.
_MESH_VALUE = re.compile(r"[!-~]{1,128}")

__all__ = ["ANONYMOUS", "CALLER", "AuthInterceptor", "Caller", "KeyStore", "current_caller", "key_digest"]

CALLER: ContextVar[Caller] = ContextVar("mistral_serve_caller", default=ANONYMOUS)


def current_caller() -> Caller:
    """The identity of the caller of the RPC being handled."""
    return CALLER.get()


def key_digest(key: str) -> str:
    """What a keys file stores for `key`: `printf %s "$KEY" | sha256sum`."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_digests(lines: Iterable[str], source: str) -> frozenset[str]:
    """Digests of a keys file or list: one SHA-256 hex digest a line; blank lines and `#` comments skipped."""
    digests = set()
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if not _DIGEST.fullmatch(entry):
            # Never echo the line: it might be a raw key pasted by mistake.
            raise SettingError(f"{source}: entry {number} is not a SHA-256 hex digest (64 hex characters)")
        digests.add(entry)
    return frozenset(digests)


class KeyStore:
    """Accepted key digests, from a file (re-read when it changes) and from a list, and what the
    file's lines say of their callers (names, quotas)."""

    def __init__(
        self, digests: Iterable[str] = (), path: str | None = None, *, default_quota: Quota = UNLIMITED
    ) -> None:
        self._fixed = parse_digests(digests, "MISTRAL_SERVE_API_KEYS")
        self._path = path
        self._default_quota = default_quota
        self._file = KeysFile()
        self._mtime: float | None = None
        self._checked = 0.0
        if path is not None:
            self._load()
        if not self.digests and not self._file.identities:
            log.error("API keys are configured but none is listed: every call will be refused")

    @property
    def digests(self) -> frozenset[str]:
        return self._fixed | self._file.keys.keys()

    def match(self, key: str) -> str | None:
        """The digest `key` matches, or None. Compares against every digest in constant time."""
        self.maybe_reload()
        presented = key_digest(key)
        found = None
        for digest in self.digests:
            if hmac.compare_digest(digest, presented):
                found = digest
        return found

    def key_caller(self, digest: str) -> Caller:
        """The caller a matched key is: its listed name and quota, else `key:<16 hex>`."""
        listing = self._file.keys.get(digest)
        if listing is not None and listing.name is not None:
            return Caller(listing.name, listing.quota, listed=True)
        return Caller(f"key:{digest[:16]}", None if listing is None else listing.quota)

    def listing(self, identity: str) -> Listing | None:
        """What the file says of a `cert:`/`mesh:` caller, if it lists it."""
        self.maybe_reload()
        return self._file.identities.get(identity)

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if self._path is None or now - self._checked < RELOAD_INTERVAL_S:
            return
        self._checked = now
        try:
            if os.stat(self._path).st_mtime != self._mtime:
                self._load()
        except (OSError, SettingError) as exc:
            log.error("keeping the previous API keys: cannot reload %s: %s", self._path, exc)

    def _load(self) -> None:
        assert self._path is not None
        mtime = os.stat(self._path).st_mtime
        with open(self._path, encoding="utf-8") as file:
            self._file = parse_keys_file(file, self._path, default=self._default_quota)
        self._mtime = mtime
        self._checked = time.monotonic()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        keys: KeyStore | None,
        *,
        mtls: bool,
        allowed_client_names: tuple[str, ...] = (),
        caller_header: str | None = None,
    ) -> None:
        self._keys = keys
        self._mtls = mtls
        self._allowed_names = frozenset(allowed_client_names)
        self.caller_header = caller_header.lower() if caller_header else None

    @property
    def enabled(self) -> bool:
        return self._keys is not None or self._mtls or self.caller_header is not None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or not self.enabled
            or handler_call_details.method.startswith(PUBLIC_METHOD_PREFIXES)
        ):
            return handler
        metadata = handler_call_details.invocation_metadata
        authorization = _header(metadata, "authorization")
        mesh = _header(metadata, self.caller_header) if self.caller_header else None

        async def gate(request: Any, context: Context) -> None:
            CALLER.set(self.authenticate(authorization, context.auth_context(), mesh))

        return gated(handler, gate)

    def authenticate(
        self, authorization: str | None, auth_context: Mapping[str, Iterable[bytes]], mesh: str | None = None
    ) -> Caller:
        """The caller these credentials identify; raises Unauthenticated or PermissionDenied.

        `mesh` is the caller header's value (when the header is configured): it names the caller
        once the other credentials configured passed."""
        caller = ANONYMOUS
        if self._mtls:
            caller = self._certificate_caller(auth_context)
        if self._keys is not None and self.keys_required():
            caller = self._keys.key_caller(self._key_digest(authorization))
        if mesh is not None:
            if not _MESH_VALUE.fullmatch(mesh):
                raise Unauthenticated(
                    f"the {self.caller_header} header must be 1-128 printable characters without spaces"
                )
            caller = self._listed(f"mesh:{mesh}")
        return caller

    def keys_required(self) -> bool:
        """Keys are asked for when the keys file or list holds one, or when nothing else vouches for
        callers: a file of only `cert:`/`mesh:` lines gives certificates or mesh callers their
        quotas without asking for keys, and refuses everyone on its own."""
        if self._keys is None:
            return False
        self._keys.maybe_reload()
        return bool(self._keys.digests) or not (self._mtls or self.caller_header)

    def _listed(self, identity: str) -> Caller:
        listing = None if self._keys is None else self._keys.listing(identity)
        return Caller(identity, None if listing is None else listing.quota, listed=listing is not None)

    def _key_digest(self, authorization: str | None) -> str:
        assert self._keys is not None
        if not authorization:
            raise Unauthenticated(
                "this service needs an API key: send the header `authorization: Bearer <key>`"
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("the authorization header must read `Bearer <key>`")
        digest = self._keys.match(key.strip())
        if digest is None:
            raise Unauthenticated("the API key is not valid")
        return digest

    def _certificate_caller(self, auth_context: Mapping[str, Iterable[bytes]]) -> Caller:
        names = [
            value.decode(errors="replace")
            for field in ("x509_common_name", "x509_subject_alternative_name")
            for value in auth_context.get(field, [])
        ]
        if not names:
            raise Unauthenticated("this service needs a client certificate (mTLS)")
        if self._allowed_names and not self._allowed_names.intersection(names):
            raise PermissionDenied(f"client certificate {names[0]!r} may not call this service")
        return self._listed(f"cert:{names[0]}")


def _header(metadata: Any, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None
