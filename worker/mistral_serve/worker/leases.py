"""Job leases on the pool's stream, kept in the consumer group's pending list.

A job's lease is its pending entry's idle time: the owner resets it (XCLAIM ... JUSTID) every third
of the lease; another worker claims entries idle longer than the lease (XAUTOCLAIM). The owner
check and the reset are one script, so a worker can never take back a job that was claimed away.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis

from mistral_serve.common import keys
from mistral_serve.common.fair_queue import Entry

# Returns the ids that are no longer this consumer's (claimed by another worker, or gone).
_REFRESH = """
local lost = {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 0 or p[1][2] ~= ARGV[2] then
    table.insert(lost, ARGV[i])
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
  end
end
return lost
"""


class Leases:
    def __init__(self, client: redis.Redis, *, consumer_name: str, lease_ms: int) -> None:
        self._redis = client
        self._name = consumer_name
        self.lease_ms = lease_ms
        self._refresh = client.register_script(_REFRESH)
        self._cursors: dict[str, bytes] = {}
        # Take XAUTOCLAIM's reply as Redis sent it: redis-py's parser fails on Redis 6.2's nil entries.
        client.set_response_callback("XAUTOCLAIM", _unparsed)

    async def refresh(self, stream: str, entry_ids: Sequence[bytes]) -> set[bytes]:
        """Renew the leases of `entry_ids` in `stream`; return those this worker no longer holds."""
        return await self._set_idle(stream, entry_ids, idle_ms=0)

    async def hand_back(self, stream: str, entry_ids: Sequence[bytes]) -> None:
        """Mark these jobs' leases lapsed so another worker claims them at once (drain)."""
        await self._set_idle(stream, entry_ids, idle_ms=self.lease_ms * 10)

    async def _set_idle(self, stream: str, entry_ids: Sequence[bytes], idle_ms: int) -> set[bytes]:
        if not entry_ids:
            return set()
        lost = await self._refresh(keys=[stream], args=[keys.WORKER_GROUP, self._name, idle_ms, *entry_ids])
        return {bytes(entry_id) for entry_id in lost}

    async def claim_lapsed(self, stream: str, count: int) -> list[Entry]:
        """Take over up to `count` jobs of `stream` whose lease lapsed, walking its pending list in turns."""
        cursor = self._cursors.get(stream, b"0-0")
        reply = await self._redis.execute_command(  # type: ignore[no-untyped-call]
            "XAUTOCLAIM", stream, keys.WORKER_GROUP, self._name, self.lease_ms, cursor, "COUNT", count
        )
        self._cursors[stream], entries = parse_autoclaim(reply)
        return entries

    async def delivery_count(self, stream: str, entry_id: bytes) -> int:
        """How many times the entry was handed to a worker: its first run plus each claim."""
        rows = await self._redis.xpending_range(stream, keys.WORKER_GROUP, entry_id, entry_id, 1)
        return int(rows[0]["times_delivered"]) if rows else 0


def parse_autoclaim(reply: Any) -> tuple[bytes, list[Entry]]:
    """XAUTOCLAIM's reply as (next cursor, entries), for both shapes.

    Redis 6.2 answers [cursor, entries] and claims a deleted entry as [id, nil], which stays pending
    (returned with None fields, for the caller to ack); Redis 7 answers [cursor, entries, deleted
    ids], leaves deleted entries out and drops them from the pending list itself.
    """
    cursor = reply[0]
    entries: list[Entry] = []
    for item in reply[1]:
        entry_id, fields = item[0], item[1]
        if fields is None:
            entries.append((bytes(entry_id), None))
        else:
            flat = list(fields)
            entries.append((bytes(entry_id), dict(zip(flat[0::2], flat[1::2], strict=True))))
    return bytes(cursor), entries


def _unparsed(response: Any, **options: Any) -> Any:
    return response
