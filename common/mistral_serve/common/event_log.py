"""Reading a request's event stream back: the one reader of its records, for both processes.

The frontend replays them to a caller who reattaches (`fanout.history`); a worker that takes over a
lost job resumes after the tokens they hold.
"""

from __future__ import annotations

import redis.asyncio as redis

from mistral_serve.common import keys
from mistral_serve.queue.v1 import queue_pb2

_EVENT_FIELD = keys.EVENT_FIELD.encode()


def parse_record(fields: dict[bytes, bytes]) -> queue_pb2.EventRecord:
    """The EventRecord of one stream entry's fields."""
    return queue_pb2.EventRecord.FromString(fields[_EVENT_FIELD])


async def read_records(
    client: redis.Redis, pool: str, request_id: str
) -> list[tuple[bytes, queue_pb2.EventRecord]]:
    """Every record written for `request_id` so far, with its entry id, oldest first."""
    entries = await client.xrange(keys.events_stream(pool, request_id))
    return [(entry_id, parse_record(fields)) for entry_id, fields in entries]
