"""Overload: low priority is refused first, high priority keeps a reserve and is served first."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mistral_serve.client import ChatClient
from mistral_serve.v1 import chat_pb2
from tests.integration.conftest import Stack
from tests.support.requests import chat
from tests.support.scripted_engine import ScriptedEngine


def with_priority(priority: int, text: str) -> chat_pb2.ChatRequest:
    request = chat(text)
    request.priority = priority
    return request


async def first_event(
    client: ChatClient, request: chat_pb2.ChatRequest
) -> tuple[asyncio.Task[str | None], str]:
    """Start a stream, return its request id once admitted and a task draining the rest."""
    stream = client.stream(request)
    started = await anext(stream)

    async def drain() -> str | None:
        """The kind of the stream's last event."""
        last = None
        async for event in stream:
            last = event.WhichOneof("event")
        return last

    return asyncio.create_task(drain()), started.started.request_id


async def test_bands_are_admitted_up_to_their_own_bounds(stack: Stack) -> None:
    frontend = await stack.frontend(max_backlog=8)
    client = stack.client(frontend, max_attempts=1)
    streams = []
    admitted = {-1: 0, 0: 0, 1: 0}
    for priority in (-1, 0, 1):  # no worker: everything admitted stays in the backlog
        while True:
            try:
                streams.append(await first_event(client, with_priority(priority, "x")))
                admitted[priority] += 1
            except grpc.aio.AioRpcError as refused:
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                break
    # low stops at 3/4 of the bound, normal at the bound, high uses the reserve of an eighth.
    assert admitted == {-1: 6, 0: 2, 1: 1}
    for task, _ in streams:
        task.cancel()


async def test_higher_priority_is_served_first_when_contended(stack: Stack) -> None:
    frontend = await stack.frontend()
    client = stack.client(frontend)
    waiting = []
    for priority in (-1, 0, 1, -1, 0, 1):
        waiting.append((priority, await first_event(client, with_priority(priority, f"p{priority}"))))
    engine = ScriptedEngine()
    await stack.worker(engine, max_inflight=1)  # one job at a time: the queue is contended
    assert await asyncio.gather(*(task for _, (task, _) in waiting)) == ["finished"] * 6

    band_of = {request_id: priority for priority, (_, request_id) in waiting}
    assert [band_of[rid] for rid in engine.started_ids] == [1, 1, 0, 0, -1, -1]


async def test_refused_low_priority_does_not_disturb_admitted_requests(stack: Stack) -> None:
    frontend = await stack.frontend(max_backlog=4)
    client = stack.client(frontend, max_attempts=1)
    admitted = [await first_event(client, with_priority(0, f"keep {i}")) for i in range(3)]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await first_event(client, with_priority(-5, "too low"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await stack.worker()
    assert await asyncio.gather(*(task for task, _ in admitted)) == ["finished"] * 3
