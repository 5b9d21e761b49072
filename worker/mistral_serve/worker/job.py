"""One claimed queue entry's life on this worker: the `Job`, and the one place that decides a stop.

A job is stopped by a cancel, its deadline, nobody following it, or the loss of its lease; `Job.stop`
records why (and cancels the generation when one runs), and `stopped_event` turns that reason into
the job's terminal event. A worker that drains does not stop jobs: it cancels their tasks, which
leaves the entries unacked for another worker.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from google.rpc import code_pb2

from mistral_serve.common.contract import error_event
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2


class EntryRef(NamedTuple):
    stream: str
    entry_id: bytes


class StopReason(enum.Enum):
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    DETACHED = "detached"
    LEASE_LOST = "lease lost"


class LeaseLost(Exception):
    """Another worker took this job over: this one must neither write nor ack anything more."""


class HandBack(Exception):
    """This worker is stopping and cannot finish the job: it goes unacked to another worker."""


@dataclass(eq=False, slots=True)
class Job:
    ref: EntryRef
    queued: queue_pb2.QueuedRequest
    # Which run of the entry this is: 1 for the first, n+1 after n workers were lost (or drained).
    attempt: int = 1
    # The whole job (start, run, terminal event, ack), set once it is scheduled.
    task: asyncio.Task[None] | None = None
    # The generation on the engine, while it runs.
    generation: asyncio.Task[chat_pb2.ChatEvent] | None = None
    stop_reason: StopReason | None = None
    # Set once the generation ended: a stop after that changes nothing.
    ended: bool = field(default=False)
    # Redis came back without the job's queue entry: no lease is left to keep or lose, and no other
    # worker can claim it, so this worker runs it to its end (`restarts.RestartGuard`).
    unleased: bool = field(default=False)

    @property
    def request_id(self) -> str:
        return self.queued.request_id

    @property
    def resumed(self) -> bool:
        return self.attempt > 1

    def stop(self, reason: StopReason) -> None:
        """Stop the job for `reason`: before it starts (it then never reaches the engine) or while it runs.

        The first reason wins, except a lost lease, which always does: then nothing may be written.
        """
        if self.ended:
            return
        if self.stop_reason is None or reason is StopReason.LEASE_LOST:
            self.stop_reason = reason
        if self.generation is not None and not self.generation.done():
            self.generation.cancel()


# The terminal event of a job stopped while it ran, by reason (a lost lease writes none).
_STOPPED_RUNNING = {
    StopReason.CANCELLED: (code_pb2.CANCELLED, "the request was cancelled"),
    StopReason.DEADLINE: (code_pb2.DEADLINE_EXCEEDED, "the request's deadline passed"),
    StopReason.DETACHED: (code_pb2.CANCELLED, "nobody followed the request for its detach grace"),
}


def stopped_event(reason: StopReason, *, started: bool) -> chat_pb2.ChatEvent:
    """The terminal event of a job stopped for `reason`; raises `LeaseLost` when it must write nothing."""
    if reason is StopReason.LEASE_LOST:
        raise LeaseLost()
    if not started:
        return error_event(code_pb2.CANCELLED, "the request was cancelled before it started")
    code, message = _STOPPED_RUNNING[reason]
    return error_event(code, message)
