"""A repeated client_request_id gets the first run's events instead of a second run.

The key is the caller's identity plus their client_request_id, so two callers never share a run.
The first request claims the key (SET NX, for the idempotency window) with its request id and a
fingerprint of the request; a repeat with the same fingerprint replays the first run's event
stream from its start, live while it runs; a repeat with another request under the same id is
refused (INVALID_ARGUMENT on client_request_id). A request refused at admission releases the key.

A repeat follows the first run like a reattach from its first delta (see ChatPipeline._attach).
"""

from __future__ import annotations

import contextlib
import hashlib

import redis.asyncio as redis
from redis.exceptions import RedisError

from mistral_serve.common import keys
from mistral_serve.v1 import chat_pb2

from .errors import BackendUnavailable, FieldViolation, InvalidRequest

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def fingerprint(request: chat_pb2.ChatRequest) -> str:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


class Idempotency:
    def __init__(self, client: redis.Redis, *, pool: str, ttl_s: int) -> None:
        self._redis = client
        self._pool = pool
        self._ttl_s = ttl_s
        self._release = client.register_script(_RELEASE)

    async def claim(
        self, caller: str, client_request_id: str, print_: str, request_id: str, *, path: str
    ) -> str | None:
        """None when this request runs (it holds the key now); else the request id of the first run."""
        key = keys.idempotency_key(self._pool, caller, client_request_id)
        value = f"{request_id} {print_}"
        try:
            if await self._redis.set(key, value, nx=True, ex=self._ttl_s):
                return None
            existing = await self._redis.get(key)
        except RedisError as exc:
            raise BackendUnavailable(f"the idempotency store is unreachable: {exc}") from exc
        if existing is None:  # expired between the two calls: this one is the first now
            retried: str | None = await self.claim(caller, client_request_id, print_, request_id, path=path)
            return retried
        text: str = existing.decode()
        first_id, _, first_print = text.partition(" ")
        if first_print != print_:
            raise InvalidRequest(
                [
                    FieldViolation(
                        f"{path}client_request_id",
                        "this client_request_id was used for a different request within the idempotency "
                        "window; use a new id for a new request",
                    )
                ]
            )
        return first_id

    async def release(self, caller: str, client_request_id: str, print_: str, request_id: str) -> None:
        """Free the key of a request that was not admitted, so a retry runs."""
        with contextlib.suppress(RedisError):  # else the key expires with its window
            await self._release(
                keys=[keys.idempotency_key(self._pool, caller, client_request_id)],
                args=[f"{request_id} {print_}"],
            )
