"""The frontend's one event reader (fanout.EventFanout) on a real Redis: each follower of a stream
gets exactly the records after its own position, whatever position the shared read is at."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

from mistral_serve.common import keys
from mistral_serve.frontend.fanout import EventFanout, Subscription
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2
from tests.support.waiting import until


async def _write(client: redis.Redis, request_id: str, text: str) -> bytes:
    record = queue_pb2.EventRecord(events=[chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=text))])
    entry_id: bytes = await client.xadd(
        keys.events_stream("default", request_id), {keys.EVENT_FIELD: record.SerializeToString()}
    )
    return entry_id


def _texts(sub: Subscription, into: list[str]) -> list[str]:
    while not sub.batches.empty():
        into += [event.delta.text for event in sub.batches.get_nowait()]
    return into


async def test_followers_at_different_positions_each_get_what_follows_their_own(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    fanout = EventFanout(client, "f1", pool="default", block_ms=5000)
    reader = asyncio.get_running_loop().create_task(fanout.run())
    got: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    try:
        a = fanout.open("r1")
        await fanout.attach_now("r1")
        first = await _write(client, "r1", "e1")
        await until(lambda: _texts(a, got["a"]) == ["e1"])
        await _write(client, "r1", "e2")
        third = await _write(client, "r1", "e3")
        await until(lambda: _texts(a, got["a"]) == ["e1", "e2", "e3"])
        # Behind the shared read: it must go back for b, and a must not get e2 and e3 twice.
        b = fanout.open("r1", after_entry_id=first)
        await fanout.attach_now("r1")
        await until(lambda: _texts(b, got["b"]) == ["e2", "e3"])
        # Level with it: only what comes next.
        c = fanout.open("r1", after_entry_id=third)
        await _write(client, "r1", "e4")
        await until(
            lambda: [_texts(s, got[n])[-1:] for n, s in (("a", a), ("b", b), ("c", c))] == [["e4"]] * 3
        )
        fanout.close(b)
        await _write(client, "r1", "e5")
        await until(lambda: _texts(c, got["c"]) == ["e4", "e5"])
        _texts(a, got["a"])
    finally:
        reader.cancel()
        await client.aclose()
    assert got == {"a": ["e1", "e2", "e3", "e4", "e5"], "b": ["e2", "e3", "e4"], "c": ["e4", "e5"]}
