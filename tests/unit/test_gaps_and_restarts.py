"""The follow loop's gap check (pipeline.EventStream) and the restart detector (epoch.RedisEpoch)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from google.rpc import code_pb2

from mistral_serve.common.epoch import RedisEpoch
from mistral_serve.frontend.errors import BackendUnavailable
from mistral_serve.frontend.fanout import History, Subscription
from mistral_serve.frontend.pipeline import EventStream
from mistral_serve.v1 import chat_pb2
from tests.support.waiting import until


def delta(n: int) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(delta=chat_pb2.Delta(sequence=n, text=f" t{n}"))


FINISHED = chat_pb2.ChatEvent(finished=chat_pb2.Finished(finish_reason=chat_pb2.FINISH_REASON_STOP))


class FakeFanout:
    """What Redis still holds for the request: `held`, or unreachable when None."""

    def __init__(self, held: list[chat_pb2.ChatEvent] | None) -> None:
        self.held = held
        self.reads = 0

    async def history(self, request_id: str) -> History:
        self.reads += 1
        if self.held is None:
            raise BackendUnavailable("gone")
        return History(self.held, b"9-0", 0)

    def close(self, sub: Subscription) -> None:
        pass


async def follow(batches: list[list[chat_pb2.ChatEvent]], held: list[chat_pb2.ChatEvent] | None) -> list[str]:
    sub = Subscription("r1")
    for batch in batches:
        sub.batches.put_nowait(batch)
    fanout = FakeFanout(held)
    stream = EventStream(fanout, sub, time.time() + 5, last_sequence=0)  # type: ignore[arg-type]
    out: list[str] = []
    async for event in stream:
        kind = str(event.WhichOneof("event"))
        out.append(f"d{event.delta.sequence}" if kind == "delta" else kind)
        if kind == "error":
            assert event.error.code == code_pb2.UNAVAILABLE and event.error.retryable
            assert event.error.message == "the answer was lost with the queue; send it again"
    return out


async def test_contiguous_deltas_pass_and_repeats_are_dropped() -> None:
    out = await follow([[delta(1), delta(2)], [delta(2), delta(3), FINISHED]], held=[])
    assert out == ["started", "d1", "d2", "d3", "finished"]


async def test_a_gap_is_filled_from_what_redis_still_holds() -> None:
    held = [delta(1), delta(2), delta(3), delta(4)]
    out = await follow([[delta(1)], [delta(4), delta(5), FINISHED]], held=held)
    assert out == ["started", "d1", "d2", "d3", "d4", "d5", "finished"]


async def test_a_gap_redis_cannot_fill_ends_with_one_retryable_error_never_finished() -> None:
    out = await follow([[delta(1), delta(2)], [delta(5), FINISHED]], held=[delta(1), delta(2), delta(4)])
    assert out == ["started", "d1", "d2", "error"]


async def test_a_gap_while_redis_is_unreachable_ends_with_the_error() -> None:
    out = await follow([[delta(1), delta(3), FINISHED]], held=None)
    assert out == ["started", "d1", "error"]


async def test_the_end_found_in_redis_while_filling_ends_the_stream_once() -> None:
    out = await follow([[delta(1), delta(3)]], held=[delta(1), delta(2), delta(3), FINISHED])
    assert out == ["started", "d1", "d2", "d3", "finished"]


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    async def set(self, key: str, value: bytes, nx: bool = False) -> bool:
        if nx and key in self.data:
            return False
        self.data[key] = value
        return True


@pytest.mark.parametrize("others_first", [False, True])
async def test_the_epoch_tells_a_redis_that_lost_its_data_from_one_that_kept_it(others_first: bool) -> None:
    client = FakeRedis()
    epoch = RedisEpoch(client, "default")  # type: ignore[arg-type]
    other = RedisEpoch(client, "default")  # type: ignore[arg-type]
    if others_first:
        assert not await other.data_lost()
    assert not await epoch.data_lost(), "the first look only learns the epoch"
    assert not await epoch.data_lost(), "a Redis that kept its data (AOF, or no restart)"
    client.data.clear()  # restarted empty
    if others_first:
        assert await other.data_lost()  # the other process saw it first and set a new epoch
    assert await epoch.data_lost(), "a Redis without the epoch it had lost everything"
    assert not await epoch.data_lost(), "told once"


class FakePipeline:
    def __init__(self, client: FakeAttachments) -> None:
        self._client = client
        self._asked = 0

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def exists(self, key: str) -> None:
        self._asked += 1

    async def execute(self) -> list[int]:
        self._client.checks += 1
        return [0] * self._asked  # the attached key is missing (a Redis that came back empty)


class FakeAttachments:
    def __init__(self) -> None:
        self.checks = 0

    def pipeline(self, transaction: bool = False) -> FakePipeline:
        return FakePipeline(self)


class OneJob:
    def __init__(self) -> None:
        from mistral_serve.queue.v1 import queue_pb2
        from mistral_serve.worker.job import EntryRef, Job

        self.job = Job(EntryRef("s", b"1-0"), queue_pb2.QueuedRequest(request_id="r1"))
        self.job.generation = asyncio.get_running_loop().create_future()  # type: ignore[assignment]

    def held(self) -> list[Any]:
        return [self.job]


async def test_a_missing_attached_key_cancels_only_after_a_full_renewal_period() -> None:
    from mistral_serve.worker.job import StopReason
    from mistral_serve.worker.watchers import watch_attachments

    client, jobs = FakeAttachments(), OneJob()
    patient = asyncio.create_task(watch_attachments(client, jobs, "default", 0.001, renewal_s=3600))  # type: ignore[arg-type]
    await until(lambda: client.checks >= 5)
    patient.cancel()
    assert jobs.job.stop_reason is None, "missing for less than a renewal period: not a caller gone"

    client, jobs = FakeAttachments(), OneJob()
    prompt = asyncio.create_task(watch_attachments(client, jobs, "default", 0.001, renewal_s=0.01))  # type: ignore[arg-type]
    await until(lambda: jobs.job.stop_reason is not None)
    prompt.cancel()
    assert jobs.job.stop_reason is StopReason.DETACHED
