"""A resumed job continues a stream exactly: same text, same tool calls and ids, no gap, no repeat."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from mistral_serve.common import keys
from mistral_serve.common.telemetry import get_tracer
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2
from mistral_serve.worker.engine import EngineOutput, EngineRequest
from mistral_serve.worker.events import EventWriter
from mistral_serve.worker.jobs import Resume, generate_events
from mistral_serve.worker.metrics import WorkerMetrics
from mistral_serve.worker.tracing import WorkerTelemetry
from tests.support.requests import chat
from tests.support.scripted_engine import marks

CHUNKS = [
    "Let me ",
    "check. ",
    "[TOOL_CALLS]",
    "get_",
    "weather",
    "[ARGS]",
    '{"city": ',
    '"Par',
    'is"}',
    "[TOOL_CALLS]",
    "get_time",
    "[ARGS]",
    "{}",
]


class ChunkEngine:
    """Emits CHUNKS, one token each (the marker names as special tokens), continuing after a resumed
    request's tokens."""

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        start = len(request.resume_token_ids)
        for i in range(start, len(CHUNKS)):
            yield EngineOutput(
                text=CHUNKS[i],
                token_ids=(i,),
                prompt_tokens=5,
                finish_reason="stop" if i == len(CHUNKS) - 1 else None,
                marks=marks(CHUNKS[i]),
            )
            await asyncio.sleep(0)

    def resumed_output(self, request: EngineRequest) -> EngineOutput:
        """The resumed tokens' text from their ids alone (token i is CHUNKS[i])."""
        text = "".join(CHUNKS[i] for i in request.resume_token_ids)
        return EngineOutput(text, request.resume_token_ids, 5, marks=marks(text))


async def run(redis_url: str, request_id: str, resume: Resume | None = None) -> list[queue_pb2.EventRecord]:
    """Run the job; return the records this run wrote."""
    client = aioredis.Redis.from_url(redis_url)
    before = await client.xrevrange(keys.events_stream("default", request_id), count=1)
    writer = EventWriter(client, pool="default", ttl_s=60, interval_s=0.001, max_events=1)
    flusher = asyncio.create_task(writer.run())
    queued = queue_pb2.QueuedRequest(request_id=request_id, request=chat("weather?"))
    telemetry = WorkerTelemetry(get_tracer(), WorkerMetrics("m"))
    finished = await generate_events(ChunkEngine(), writer, queued, telemetry, resume=resume)  # type: ignore[arg-type]
    await writer.emit_final(request_id, finished)
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    entries = await client.xrange(
        keys.events_stream("default", request_id), min=f"({before[0][0].decode()}" if before else "-"
    )
    await client.aclose()
    return [queue_pb2.EventRecord.FromString(fields[b"e"]) for _, fields in entries]


def events(records: list[queue_pb2.EventRecord]) -> list[chat_pb2.ChatEvent]:
    return [event for record in records for event in record.events]


async def test_resume_from_every_cut_point_gives_the_undisturbed_stream(redis_url: str) -> None:
    whole = events(await run(redis_url, "req-whole"))
    assert whole[-1].finished.finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    assert [c.name for c in whole[-1].finished.tool_calls] == ["get_weather", "get_time"]

    for cut in range(1, len(await run(redis_url, "req-count")) - 1):
        # A worker wrote `cut` records, then was lost; another resumes from what Redis holds.
        first_run = await run(redis_url, f"req-{cut}")
        kept = first_run[:cut]
        resumed = await run(redis_url, f"req-{cut}", Resume.from_records(kept))
        stream = events(kept) + events(resumed)
        deltas = [e.delta for e in stream if e.WhichOneof("event") == "delta"]
        assert [d.sequence for d in deltas] == list(range(1, len(deltas) + 1)), f"cut {cut}"
        assert "".join(d.text for d in deltas) == "Let me check. "
        assert stream[-1].finished.tool_calls == events(first_run)[-1].finished.tool_calls, f"cut {cut}"
        assert stream[-1].finished.usage.completion_tokens == len(CHUNKS)
