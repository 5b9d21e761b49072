"""One reader of a request's event records: the frontend's reattach history and the worker's resume
read the same records, written by the worker's coalescing writer into a real Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

from mistral_serve.common.contract import error_event
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
