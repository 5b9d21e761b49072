"""What may stop a job, and the terminal event each stop gives."""

from __future__ import annotations

import asyncio

import pytest
from google.rpc import code_pb2

from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.worker.job import EntryRef, Job, LeaseLost, StopReason, stopped_event


def job() -> Job:
    return Job(EntryRef("s", b"1-0"), queue_pb2.QueuedRequest(request_id="r"))


def test_a_stop_before_the_start_is_kept_for_the_start_and_the_first_reason_wins() -> None:
    j = job()
    j.stop(StopReason.CANCELLED)
    j.stop(StopReason.DETACHED)
    assert j.stop_reason is StopReason.CANCELLED
    event = stopped_event(StopReason.CANCELLED, started=False)
    assert event.error.code == code_pb2.CANCELLED
    assert "before it started" in event.error.message


def test_a_lost_lease_wins_over_any_other_reason_and_writes_nothing() -> None:
    j = job()
    j.stop(StopReason.DEADLINE)
    j.stop(StopReason.LEASE_LOST)
    assert j.stop_reason is StopReason.LEASE_LOST
    for started in (False, True):
        with pytest.raises(LeaseLost):
            stopped_event(StopReason.LEASE_LOST, started=started)


async def test_a_stop_cancels_a_running_generation_and_none_after_its_end() -> None:
    j = job()
    j.generation = asyncio.create_task(asyncio.sleep(60, result=None))  # type: ignore[arg-type]
    j.stop(StopReason.DEADLINE)
    with pytest.raises(asyncio.CancelledError):
        await j.generation
    assert stopped_event(StopReason.DEADLINE, started=True).error.code == code_pb2.DEADLINE_EXCEEDED
    assert "detach grace" in stopped_event(StopReason.DETACHED, started=True).error.message

    ended = job()
    ended.ended = True
    ended.stop(StopReason.CANCELLED)
    assert ended.stop_reason is None
