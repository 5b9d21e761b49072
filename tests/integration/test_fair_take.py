"""The fair queue's scripts against a real redis-server: admission (`RequestQueue.admit`) and the
workers' take (`fair_queue.FairTake`) give the order of deficit round robin turned one quantum at a
time, with strict bands above it, and leave nothing behind once a band is empty."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from mistral_serve.common import fair_queue, keys
from mistral_serve.common.fair_queue import FairTake
from mistral_serve.common.quota import Quota
from mistral_serve.common.telemetry import get_tracer
from mistral_serve.frontend.queue import RequestQueue
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.worker.consumer import Consumer
from mistral_serve.worker.events import EventWriter
from mistral_serve.worker.metrics import WorkerMetrics
from mistral_serve.worker.tracing import WorkerTelemetry
from tests.support.requests import chat
from tests.support.scripted_engine import ScriptedEngine
from tests.support.waiting import until_async

QUANTUM = 100


@dataclass
class ReferenceDrr:
    """Deficit round robin as the design states it, one quantum at a time: the head of the ring is
    served while its deficit covers its head request's cost, else gets its quantum and goes to the
    tail; a caller joins at the tail with one quantum and leaves, with its deficit, once empty."""

    quantum: float
    ring: deque[str] = field(default_factory=deque)
    queues: dict[str, deque[tuple[str, int]]] = field(default_factory=dict)
    deficits: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def admit(self, caller: str, request_id: str, cost: int, weight: float) -> None:
        queue = self.queues.setdefault(caller, deque())
        if not queue:
            self.ring.append(caller)
        queue.append((request_id, cost))
        self.weights[caller] = weight

    def take(self) -> str | None:
        while self.ring:
            caller = self.ring[0]
            queue = self.queues[caller]
            deficit = self.deficits.get(caller, self.weights[caller] * self.quantum)
            request_id, cost = queue[0]
            if deficit >= cost:
                queue.popleft()
                if queue:
                    self.deficits[caller] = deficit - cost
                else:
                    self.ring.popleft()
                    self.deficits.pop(caller, None)
                return request_id
            self.deficits[caller] = deficit + self.weights[caller] * self.quantum
            self.ring.rotate(-1)
        return None


@dataclass
class Pool:
    client: aioredis.Redis
    name: str
    queue: RequestQueue

    def taker(self, quantum: int = QUANTUM, consumer: str = "c") -> FairTake:
        return FairTake(self.client, pool=self.name, consumer_name=consumer, quantum_tokens=quantum)

    async def admit(
        self, caller: str, request_id: str, cost: int, *, weight: float = 1.0, priority: int = 0
    ) -> None:
        now = time.time()
        request = chat(request_id)
        request.priority = priority
        queued = queue_pb2.QueuedRequest(
            request_id=request_id,
            request=request,
            deadline_unix=now + 600,
            admitted_unix=now,
            caller=caller,
            cost_tokens=cost,
        )
        await self.queue.admit(queued, owner=caller, limits=Quota(weight=weight))


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[Pool]:
    name = f"fair-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(redis_url)
    for stream in keys.request_streams(name):
        await client.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
    queue = RequestQueue(
        client, pool=name, max_backlog=100_000, retry_after_s=1.0, frontend_id="f", cancel_ttl_s=60
    )
    yield Pool(client, name, queue)
    await client.aclose()


async def taken_ids(taker: FairTake, count: int) -> list[str]:
    """The request ids of one take, in the order they were taken."""
    taken, _ = await taker.take(count)
    return [
        queue_pb2.QueuedRequest.FromString((fields or {})[keys.REQUEST_FIELD.encode()]).request_id
        for _, entries in taken
        for _, fields in entries
    ]


async def test_takes_follow_deficit_round_robin_turned_one_quantum_at_a_time(pool: Pool) -> None:
    rng = random.Random(17)
    callers = {"a": 1.0, "b": 2.0, "c": 0.5, "d": 3.0}
    model = ReferenceDrr(QUANTUM)
    taker = pool.taker()
    order: list[str] = []
    expected: list[str] = []
    for step in range(12):  # admissions between takes: callers leave the ring, rejoin, join late
        for n in range(rng.randint(0, 25)):
            caller = rng.choice(list(callers)[: 2 + step % 3])
            # Mostly small costs, some far over a quantum (max_tokens 131k): whole turns are skipped.
            cost = rng.choice([rng.randint(1, 300), rng.randint(1, 300), rng.randint(1000, 131_072)])
            request_id = f"{caller}-{step}-{n}"
            model.admit(caller, request_id, cost, callers[caller])
            await pool.admit(caller, request_id, cost, weight=callers[caller])
        count = rng.randint(1, 8)
        order += await taken_ids(taker, count)
        expected += [rid for rid in (model.take() for _ in range(count)) if rid is not None]
    while (batch := await taken_ids(taker, 5)) != []:
        order += batch
    expected += list(iter(model.take, None))
    assert len(order) > 100
    assert order == expected


async def test_a_band_left_empty_keeps_no_deficit_no_weight_and_no_count(pool: Pool) -> None:
    taker = pool.taker()
    await pool.admit("a", "a1", 10)
    await pool.admit("b", "b1", 5000)
    await pool.admit("a", "a2", 10)
    assert await taken_ids(taker, 10) == ["a1", "a2", "b1"]
    band = keys.NORMAL
    for key in (
        keys.fair_ring(pool.name, band),
        keys.fair_deficits(pool.name, band),
        keys.fair_weights(pool.name, band),
        keys.waiting_count(pool.name, band),
        keys.caller_queue(pool.name, band, "a"),
    ):
        assert not await pool.client.exists(key), key
    # Taken entries are pending for this consumer in the band stream, leased as before.
    pending = await pool.client.xpending(keys.request_stream(pool.name), keys.WORKER_GROUP)
    assert pending["pending"] == 3 and pending["consumers"][0]["name"] == b"c"


async def test_the_waiting_count_holds_the_admission_times_of_what_still_waits(pool: Pool) -> None:
    taker = pool.taker()
    await pool.admit("a", "a-old", 10_000)
    first = await pool.client.lindex(keys.waiting_count(pool.name, keys.NORMAL), 0)  # type: ignore[misc]
    await pool.admit("b", "b-new", 1)
    assert await taken_ids(taker, 1) == ["b-new"]  # taken out of admission order
    waiting = await pool.client.lrange(keys.waiting_count(pool.name, keys.NORMAL), 0, -1)  # type: ignore[misc]
    assert waiting == [first]  # the oldest waiting request's time, for the queue-wait gauge
    assert abs(fair_queue.waiting_since(first) - time.time()) < 60


async def test_higher_bands_are_emptied_before_any_deficit_of_a_lower_one_counts(pool: Pool) -> None:
    taker = pool.taker()
    await pool.admit("quiet", "low-quiet", 1, priority=-1)
    await pool.admit("noisy", "normal-1", 50_000)
    await pool.admit("noisy", "high-1", 50_000, priority=3)
    await pool.admit("noisy", "normal-2", 50_000)
    await pool.admit("quiet", "high-2", 1, priority=1)
    # Within the high band, quiet's 1-token request fits its first quantum; noisy's needs turns.
    assert await taken_ids(taker, 2) == ["high-2", "high-1"]
    assert await taken_ids(taker, 5) == ["normal-1", "normal-2", "low-quiet"]


async def test_nothing_waiting_answers_the_wake_id_an_idle_worker_blocks_from(pool: Pool) -> None:
    taker = pool.taker()
    taken, wake_id = await taker.take(4)
    assert taken == [] and wake_id == b"0-0"  # no admission yet: any wake entry is news
    await pool.admit("a", "a1", 1)
    assert await taken_ids(taker, 4) == ["a1"]
    _, wake_id = await taker.take(4)
    last = await pool.client.xrevrange(taker.wake_stream, count=1)
    assert wake_id == last[0][0]
    # An admission after the empty take is seen by a read from that id, however late it starts.
    await pool.admit("a", "a2", 1)
    assert wake_id is not None
    woken = await asyncio.wait_for(pool.client.xread({taker.wake_stream: wake_id}, block=60_000), 10)
    assert woken


async def test_an_idle_worker_blocked_on_the_wake_stream_takes_an_admission_at_once(pool: Pool) -> None:
    writer = EventWriter(pool.client, pool=pool.name, ttl_s=60, interval_s=0.01, max_events=8)
    telemetry = WorkerTelemetry(get_tracer(), WorkerMetrics("m"))
    # A block far longer than the wait below: only the admission's wake entry can end it in time.
    consumer = Consumer(
        pool.client,
        ScriptedEngine(),
        writer,
        telemetry,
        pool=pool.name,
        consumer_name="c",
        max_inflight=4,
        block_ms=600_000,
    )
    reading = asyncio.create_task(consumer.read_new(4))

    async def blocked() -> bool:
        return any(client.get("cmd") == "xread" for client in await pool.client.client_list())

    try:
        await until_async(blocked, timeout_s=10)
        await pool.admit("a", "a1", 1)
        assert await asyncio.wait_for(reading, timeout=30) == 1
    finally:
        reading.cancel()
        await consumer.drain(0)
