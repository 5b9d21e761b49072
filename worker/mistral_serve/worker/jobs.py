"""Runs one queued request on the engine and turns its outputs into ChatEvents."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis.asyncio as redis

from mistral_serve.common.contract import FINISH_REASONS
from mistral_serve.common.event_log import read_records
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

from .engine import Engine, EngineFinishReason, EngineRequest
from .events import EventWriter
from .grammar import calls_allowed
from .tool_calls import ToolCallStreamParser
from .tracing import JobObservation, WorkerTelemetry


@dataclass(frozen=True, slots=True)
class Resume:
    """What an earlier run of a request already streamed, read back from its event records."""

    sequence: int = 0
    token_ids: tuple[int, ...] = ()
    raw_text: str = ""
    # The earlier run already wrote a terminal event: only the ack is missing.
    finished: bool = False

    @classmethod
    async def read(cls, client: redis.Redis, pool: str, request_id: str) -> Resume:
        """What the request's event stream holds, read by the reader the frontend's replay uses."""
        return cls.from_records([record for _, record in await read_records(client, pool, request_id)])

    @classmethod
    def from_records(cls, records: list[queue_pb2.EventRecord]) -> Resume:
        sequence = 0
        token_ids: list[int] = []
        raw: list[str] = []
        finished = False
        for record in records:
            token_ids.extend(record.token_ids)
            raw.append(record.raw_text)
            for event in record.events:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    sequence = max(sequence, event.delta.sequence)
                elif kind in ("finished", "error"):
                    finished = True
        return cls(sequence, tuple(token_ids), "".join(raw), finished)


@dataclass(slots=True)
class _Unsent:
    """Engine output fed to the parser since the last delta went out."""

    token_ids: list[int] = field(default_factory=list)
    raw_text: list[str] = field(default_factory=list)
    logprobs: list[chat_pb2.TokenLogprob] = field(default_factory=list)


async def generate_events(
    engine: Engine,
    writer: EventWriter,
    queued: queue_pb2.QueuedRequest,
    telemetry: WorkerTelemetry,
    *,
    resume: Resume | None = None,
    attempt: int = 1,
) -> chat_pb2.ChatEvent:
    """Stream `queued`'s deltas through `writer`; return the `finished` event (not yet written).

    With `resume`, the engine continues after the tokens already streamed, the parser is brought to
    the state it had then (by feeding it those tokens again as the engine decodes them, its output
    dropped: the caller has it),
    and sequence numbers go on from the last one sent. The run is traced and measured (`tracing`) as
    run number `attempt` of the job.
    """
    resumed_tokens = None if resume is None else len(resume.token_ids)
    with JobObservation(queued, telemetry, attempt=attempt, resumed_tokens=resumed_tokens) as job:
        finished = await _generate(engine, writer, queued, resume or Resume(), job)
        job.finished(finished.finished)
        return finished


async def _generate(
    engine: Engine, writer: EventWriter, queued: queue_pb2.QueuedRequest, resume: Resume, job: JobObservation
) -> chat_pb2.ChatEvent:
    request_id = queued.request_id
    started_at = job.started_at
    engine_request = EngineRequest(
        request_id,
        queued.request,
        resume_token_ids=resume.token_ids,
        prompt_token_ids=queued.prompt_token_ids,
        prompt_fingerprint=queued.tokenizer_fingerprint,
    )
    parser = ToolCallStreamParser(call_id_seed=request_id, calls_allowed=calls_allowed(queued.request))
    if resume.token_ids:
        # Replayed by token id, as the engine streamed them: markers are found again by their ids.
        replayed = engine.resumed_output(engine_request)
        parser.feed(replayed.text, replayed.marks)
    sequence = resume.sequence
    unsent = _Unsent()
    usage = chat_pb2.Usage(completion_tokens=len(resume.token_ids))
    first_token_at: float | None = None
    reason: EngineFinishReason = "stop"
    stop = ""

    def emit(text: str, calls: list[chat_pb2.FunctionCallDelta]) -> None:
        nonlocal sequence, unsent
        sequence += 1
        if job.output is not None:
            job.output.append(text)
        delta = chat_pb2.Delta(
            sequence=sequence,
            text=text,
            tool_calls=calls,
            token_count=len(unsent.token_ids),
            logprobs=unsent.logprobs,
        )
        writer.emit(
            request_id,
            chat_pb2.ChatEvent(delta=delta),
            urgent=sequence == 1,
            token_ids=unsent.token_ids,
            raw_text="".join(unsent.raw_text),
        )
        unsent = _Unsent()

    async for out in engine.generate(engine_request):
        usage.prompt_tokens = out.prompt_tokens
        usage.image_tokens = out.image_tokens
        usage.completion_tokens += len(out.token_ids)
        unsent.token_ids.extend(out.token_ids)
        unsent.raw_text.append(out.text)
        unsent.logprobs.extend(out.logprobs)
        if first_token_at is None and out.token_ids:
            job.first_token()
            first_token_at = job.first_token_at
        text, calls = parser.feed(out.text, out.marks)
        if text or calls:
            emit(text, calls)
        if out.finish_reason is not None:
            reason = out.finish_reason
            stop = out.stop or ""
    tail, tool_calls = parser.finish()
    if tail or unsent.logprobs:
        # The last tokens may bring no text (the end token): their logprobs still reach the caller.
        emit(tail, [])
    finish_reason = FINISH_REASONS[reason]
    if tool_calls and reason == "stop":
        finish_reason = chat_pb2.FINISH_REASON_TOOL_CALLS
    end = time.time()
    admitted = queued.admitted_unix
    return chat_pb2.ChatEvent(
        finished=chat_pb2.Finished(
            finish_reason=finish_reason,
            tool_calls=tool_calls,
            usage=usage,
            stop=stop,
            timings=chat_pb2.Timings(
                queue_seconds=max(started_at - admitted, 0.0),
                time_to_first_token_seconds=max((first_token_at or end) - admitted, 0.0),
                total_seconds=max(end - admitted, 0.0),
            ),
        )
    )
