"""One reader of a request's event records: the frontend's reattach history and the worker's resume
read the same records, written by the worker's coalescing writer into a real Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

from mistral_serve.common import keys
from mistral_serve.common.contract import error_event
from mistral_serve.common.redis_client import ReplicaWait
from mistral_serve.frontend.fanout import EventFanout
from mistral_serve.v1 import chat_pb2
from mistral_serve.worker.events import EventWriter
from mistral_serve.worker.jobs import Resume
from tests.support.waiting import until


async def test_history_and_resume_read_the_same_records(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    writer = EventWriter(client, pool="default", ttl_s=60, interval_s=0.001, max_events=64)
    task = asyncio.get_running_loop().create_task(writer.run())
    try:
        for sequence, (text, tokens) in enumerate([("Hel", [1, 2]), ("lo", [3]), (" you", [4, 5])], 1):
            delta = chat_pb2.ChatEvent(delta=chat_pb2.Delta(sequence=sequence, text=text))
            writer.emit("r1", delta, urgent=True, token_ids=tokens, raw_text=text)
            await until(lambda n=sequence: writer.writes >= n)  # type: ignore[misc]
        await writer.emit_final("r1", error_event(14, "gone", retryable=True))
        history = await EventFanout(client, "f1", pool="default").history("r1")
        resume = await Resume.read(client, "default", "r1")
    finally:
        task.cancel()
        await client.aclose()
    assert [e.delta.text for e in history.events if e.WhichOneof("event") == "delta"] == ["Hel", "lo", " you"]
    assert history.events[-1].error.message == "gone"
    assert history.last_sequence == resume.sequence == 3
    assert resume == Resume(sequence=3, token_ids=(1, 2, 3, 4, 5), raw_text="Hello you", finished=True)


async def _command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls of each command since CONFIG RESETSTAT that did not fail (the first EVALSHA of a script
    Redis does not hold yet fails with NOSCRIPT, and redis-py loads it and calls again)."""
    stats = await client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(stat["calls"]) - int(stat.get("failed_calls", 0))
        for name, stat in stats.items()
    }


async def test_a_flush_of_many_streams_is_one_script_call(redis_url: str) -> None:
    """Every request pending at a flush goes in one EVALSHA (one command packed, one reply), each
    stream with its record and its TTL set on its first record."""
    client = redis.Redis.from_url(redis_url)
    writer = EventWriter(client, pool="default", ttl_s=60, interval_s=0.05, max_events=64)
    ids = [f"r{i}" for i in range(40)]
    for n, request_id in enumerate(ids):
        writer.emit(
            request_id, chat_pb2.ChatEvent(delta=chat_pb2.Delta(sequence=1, text=str(n))), token_ids=[n]
        )
    await client.config_resetstat()
    task = asyncio.get_running_loop().create_task(writer.run())
    try:
        await until(lambda: writer.writes >= 1)
        calls = await _command_calls(client)
        histories = [await EventFanout(client, "f1", pool="default").history(rid) for rid in ids]
        ttls = [await client.ttl(keys.events_stream("default", rid)) for rid in ids]
    finally:
        task.cancel()
        await client.aclose()
    assert writer.writes == 1
    assert calls.get("evalsha") == 1 and calls.get("xadd") == len(ids)
    assert [h.events[0].delta.text for h in histories] == [str(n) for n in range(len(ids))]
    assert all(0 < ttl <= 60 for ttl in ttls)


async def test_a_terminal_flush_waits_for_replicas_after_its_script(redis_url: str) -> None:
    """With WAIT on, the terminal flush is one EVAL followed by WAIT on the same connection; the
    write stands when no replica confirms (this Redis has none)."""
    client = redis.Redis.from_url(redis_url)
    writer = EventWriter(
        client,
        pool="default",
        ttl_s=60,
        interval_s=0.001,
        max_events=64,
        replica_wait=ReplicaWait(replicas=1, timeout_ms=10),
    )
    task = asyncio.get_running_loop().create_task(writer.run())
    try:
        writer.emit("r1", chat_pb2.ChatEvent(delta=chat_pb2.Delta(sequence=1, text="a")), urgent=True)
        await until(lambda: writer.writes >= 1)
        await client.config_resetstat()
        await writer.emit_final("r1", error_event(14, "gone", retryable=True))
        calls = await _command_calls(client)
        history = await EventFanout(client, "f1", pool="default").history("r1")
        ttl = await client.ttl(keys.events_stream("default", "r1"))
    finally:
        task.cancel()
        await client.aclose()
    assert calls.get("eval") == 1 and calls.get("wait") == 1
    assert [e.WhichOneof("event") for e in history.events] == ["delta", "error"]
    assert 0 < ttl <= 60


async def test_a_flush_sets_the_ttl_of_new_streams_only(redis_url: str) -> None:
    """In a flush mixing new streams and streams whose TTL was set less than half a TTL ago, the new
    ones get the TTL and the others keep theirs (a sentinel PEXPIRE here tells them apart)."""
    client = redis.Redis.from_url(redis_url)
    writer = EventWriter(client, pool="default", ttl_s=60, interval_s=0.001, max_events=64)
    old, new = [f"old{i}" for i in range(10)], [f"new{i}" for i in range(10)]

    def emit(request_ids: list[str], sequence: int) -> None:
        for request_id in request_ids:
            writer.emit(request_id, chat_pb2.ChatEvent(delta=chat_pb2.Delta(sequence=sequence, text="x")))

    task = asyncio.get_running_loop().create_task(writer.run())
    try:
        emit(old, 1)
        await until(lambda: writer.writes >= 1)
        for request_id in old:
            await client.pexpire(keys.events_stream("default", request_id), 500_000)
        emit(new + old, 2)  # the new ones first in the batch, so the script's order is the writer's
        await until(lambda: writer.writes >= 2)
        old_ttls = [await client.pttl(keys.events_stream("default", rid)) for rid in old]
        new_ttls = [await client.pttl(keys.events_stream("default", rid)) for rid in new]
        lengths = [await client.xlen(keys.events_stream("default", rid)) for rid in old + new]
    finally:
        task.cancel()
        await client.aclose()
    assert all(60_000 < ttl <= 500_000 for ttl in old_ttls)
    assert all(0 < ttl <= 60_000 for ttl in new_ttls)
    assert lengths == [2] * len(old) + [1] * len(new)


async def test_terminal_events_and_their_jobs_acks_are_one_script_call(redis_url: str) -> None:
    """A job's XACK and XDEL go in the call that writes its terminal event, for every job ending in it."""
    client = redis.Redis.from_url(redis_url)
    stream = keys.request_stream("acks")
    await client.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
    entries = [await client.xadd(stream, {"r": str(n)}) for n in range(3)]
    await client.xreadgroup(keys.WORKER_GROUP, "w1", {stream: ">"}, count=3)
    writer = EventWriter(client, pool="acks", ttl_s=60, interval_s=0.05, max_events=64)
    done = chat_pb2.ChatEvent(finished=chat_pb2.Finished())
    await client.config_resetstat()
    task = asyncio.get_running_loop().create_task(writer.run())
    try:
        # Two jobs end in one flush, with a request still running beside them; the third job stays.
        writer.emit("running", chat_pb2.ChatEvent(delta=chat_pb2.Delta(sequence=1, text="x")))
        await asyncio.gather(
            writer.emit_final("r0", done, ack=(stream, entries[0])),
            writer.emit_final("r1", done, ack=(stream, entries[1])),
        )
        calls = await _command_calls(client)
        pending = await client.xpending(stream, keys.WORKER_GROUP)
        left = [entry_id for entry_id, _ in await client.xrange(stream)]
        history = await EventFanout(client, "f1", pool="acks").history("r1")
    finally:
        task.cancel()
        await client.aclose()
    assert writer.writes == 1 and calls.get("evalsha") == 1
    assert (calls.get("xack"), calls.get("xdel")) == (2, 2)
    assert pending["pending"] == 1 and left == [entries[2]]
    assert history.events[-1].WhichOneof("event") == "finished"
