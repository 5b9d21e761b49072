"""ChatClient's wait before retrying a refused request: at least RetryInfo's delay, spread at random."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from mistral_serve.client import ChatClient
from mistral_serve.client.client import RETRY_JITTER, retry_delay


def refused(delay_s: float) -> grpc.aio.AioRpcError:
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=int(delay_s * 1e9)))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="queue full")
    status.details.add().Pack(info)
    trailers = grpc.aio.Metadata(*rpc_status.to_status(status).trailing_metadata)
    return grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), trailers, "queue full"
    )


async def test_refused_callers_wait_at_least_the_asked_delay_and_not_in_lockstep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)

    client = ChatClient("127.0.0.1:1")
    error = refused(0.25)
    assert retry_delay(error) == pytest.approx(0.25)
    monkeypatch.setattr(asyncio, "sleep", sleep)
    for _ in range(64):
        assert await client._wait_before_retry(error, 1, time.monotonic() + 60)
    await client.close()

    assert all(0.25 <= wait <= 0.25 * (1 + RETRY_JITTER) for wait in waits)
    assert len(set(waits)) > 32, "64 refused callers would come back together"
