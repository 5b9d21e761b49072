"""Fairness within a band, end to end: a real frontend on port 0 (callers told apart by API key), the
real redis-server and a worker running the scripted engine. "When a request started" is its place in
the engine's start order (dispatches), never a wall-clock time."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from mistral_serve.common import keys
from mistral_serve.common.quota import Quota
from mistral_serve.frontend.auth import key_digest
from mistral_serve.frontend.queue import RequestQueue
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from tests.integration.conftest import Stack
from tests.support.requests import chat
from tests.support.scripted_engine import ScriptedEngine
from tests.support.waiting import until

MAX_INFLIGHT = 4


class Caller:
    """One API key's ChatStreams at the raw stub: the request id of each once admitted."""

    def __init__(self, channel: grpc.aio.Channel, key: str) -> None:
        self._stub = chat_pb2_grpc.ChatServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {key}"),)
        self.request_ids: list[str] = []
        self.finished: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def send(self, count: int) -> None:
        """Start `count` streams at once; return when every one of them was admitted."""
        admitted = [asyncio.get_running_loop().create_future() for _ in range(count)]
        self.tasks += [asyncio.create_task(self._follow(f"hi {i}", done)) for i, done in enumerate(admitted)]
        self.request_ids += await asyncio.gather(*admitted)

    async def _follow(self, text: str, admitted: asyncio.Future[str]) -> None:
        call = self._stub.ChatStream(
            chat_pb2.ChatStreamRequest(request=chat(text)), metadata=self._metadata, timeout=120
        )
        async for event in call:
            kind = event.WhichOneof("event")
            if kind == "started":
                admitted.set_result(event.started.request_id)
            elif kind in ("finished", "error"):
                self.finished.append(kind)

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()


async def test_a_quiet_caller_is_served_within_a_noisy_callers_backlog(stack: Stack) -> None:
    frontend = await stack.frontend(api_keys=(key_digest("noisy"), key_digest("quiet")))
    # 12 tokens at 100 a second: a slot frees every ~30 ms, so the noisy backlog lasts seconds.
    engine = ScriptedEngine(tokens_per_s=100)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
        noisy, quiet = Caller(channel, "noisy"), Caller(channel, "quiet")
        try:
            await noisy.send(200)
            await stack.worker(engine, max_inflight=MAX_INFLIGHT)
            await until(lambda: len(engine.started_ids) >= 2 * MAX_INFLIGHT)
            arrival = len(engine.started_ids)
            await quiet.send(10)
            await until(lambda: len(quiet.finished) == 10, timeout_s=60)
            assert quiet.finished == ["finished"] * 10

            order = engine.started_ids
            starts = sorted(order.index(request_id) for request_id in quiet.request_ids)
            noisy_before_last = sum(1 for rid in order[: starts[-1]] if rid in set(noisy.request_ids))
            # Every quiet request started before the noisy backlog was half drained...
            assert noisy_before_last < 100, (arrival, starts)
            # ...each within its fair half of the dispatches after it came, plus the slots then busy
            # (in arrival order it would wait for the ~190 noisy requests ahead of it).
            waits = [start - arrival for start in starts]
            assert all(wait <= 2 * (rank + 1) + MAX_INFLIGHT for rank, wait in enumerate(waits)), waits
        finally:
            noisy.stop()
            quiet.stop()


def admission(client: aioredis.Redis) -> RequestQueue:
    """The frontend's admission on the default pool, driven directly (for weights, which no door
    sets yet); detached requests are kept running long enough for the test."""
    return RequestQueue(
        client,
        pool="default",
        max_backlog=10_000,
        retry_after_s=1.0,
        frontend_id="direct",
        cancel_ttl_s=60,
        detach_grace_s=600.0,
    )


def queued(request_id: str, caller: str) -> queue_pb2.QueuedRequest:
    now = time.time()
    return queue_pb2.QueuedRequest(
        request_id=request_id,
        request=chat("weighted", max_tokens=2),
        deadline_unix=now + 600,
        admitted_unix=now,
        caller=caller,
        cost_tokens=500,
    )


async def test_weights_3_to_1_share_the_dispatches_3_to_1(stack: Stack) -> None:
    # Weights come from the keys file once callers are listed there (issue 17, the other half);
    # admission takes them as a parameter, which is what is driven here.
    client = aioredis.Redis.from_url(stack.redis_url)
    queue = admission(client)
    for i in range(300):
        await queue.admit(queued(f"heavy-{i}", "heavy"), owner="heavy", limits=Quota(weight=3.0))
        await queue.admit(queued(f"light-{i}", "light"), owner="light", limits=Quota(weight=1.0))
    engine = ScriptedEngine(tokens_per_s=0)
    await stack.worker(engine, max_inflight=1, fair_quantum_tokens=500)
    await until(lambda: len(engine.started_ids) >= 200, timeout_s=60)
    window = Counter(rid.split("-")[0] for rid in engine.started_ids[:200])
    await client.aclose()
    assert abs(window["heavy"] / window["light"] - 3.0) <= 0.3, window


async def test_admission_refuses_a_weight_out_of_its_bounds(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    queue = admission(client)
    for weight in (0.0, -1.0, float("nan"), float("inf"), 1e-9, 1e6):
        with pytest.raises(ValueError, match="weight"):
            await queue.admit(queued("w", "x"), owner="x", limits=Quota(weight=weight))
    assert await client.llen(keys.waiting_count("default", keys.NORMAL)) == 0  # type: ignore[misc]
    await client.aclose()


async def test_weights_from_the_keys_file_share_the_dispatches_3_to_1(stack: Stack, tmp_path: Path) -> None:
    # The same share end to end: two named keys of the keys file, weight=3 and weight=1, each
    # queueing 120 streams at the raw stub before a one-slot worker starts.
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        f"{key_digest('heavy')} name=heavy weight=3\n{key_digest('light')} name=light weight=1\n"
    )
    frontend = await stack.frontend(api_keys_file=str(keys_file))
    engine = ScriptedEngine(tokens_per_s=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
        heavy, light = Caller(channel, "heavy"), Caller(channel, "light")
        try:
            await heavy.send(120)
            await light.send(120)
            await stack.worker(engine, max_inflight=1)
            await until(lambda: len(engine.started_ids) >= 100, timeout_s=60)
            first = engine.started_ids[:100]
            share = Counter(
                "heavy"
                if rid in set(heavy.request_ids)
                else "light"
                if rid in set(light.request_ids)
                else "?"
                for rid in first
            )
            assert share["?"] == 0
            assert abs(share["heavy"] / share["light"] - 3.0) <= 0.3, share
        finally:
            heavy.stop()
            light.stop()
