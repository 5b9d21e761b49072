"""Waiting on grpc.health.v1 from tests."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from devtools.local_stack import health_status as status_of

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# What status_of reads while the server takes no RPC at all (stopped, or stopping).
NO_ANSWER = health_pb2.HealthCheckResponse.UNKNOWN


async def wait_for_status(port: int, service: str, wanted: int, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while (current := await status_of(port, service)) != wanted:
        assert loop.time() < end, f"{service!r} on port {port} stayed {current}, wanted {wanted}"
        await asyncio.sleep(0.05)


async def wait_serving(port: int, service: str, timeout_s: float = 60.0) -> None:
    await wait_for_status(port, service, SERVING, timeout_s)
