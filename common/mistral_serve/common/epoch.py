"""Noticing a Redis that came back without its data: the one restart detector of both processes.

A process remembers the value of the pool's epoch key (set once, by whoever comes first, with SET NX).
A Redis restarted without persistence comes back without that key; one restarted from its AOF keeps
it, with the data the records and queue entries need. So a changed or missing epoch means "what this
process wrote before may be gone": a worker writes back the records of the jobs it runs, a frontend
marks what it follows attached again and ends, after a rewrite window, the requests nobody restored.
The check is one GET; the epoch key never expires.
"""

from __future__ import annotations

import uuid

import redis.asyncio as redis

from mistral_serve.common import keys


class RedisEpoch:
    def __init__(self, client: redis.Redis, pool: str) -> None:
        self._redis = client
        self._key = keys.epoch_key(pool)
        self.value: bytes | None = None

    async def data_lost(self) -> bool:
        """Whether Redis lost its data since the last call (False on the first call, which only reads).

        Raises RedisError while Redis is unreachable: the caller retries, and the loss is still seen
        on the first call that reaches it.
        """
        current = await self._redis.get(self._key)
        if current is None:
            await self._redis.set(self._key, uuid.uuid4().hex.encode(), nx=True)
            current = await self._redis.get(self._key)
        lost = self.value is not None and current != self.value
        self.value = current
        return lost
