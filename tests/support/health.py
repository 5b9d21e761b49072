"""Waiting on grpc.health.v1 from tests (the launcher's own waits, devtools.local_stack)."""

from __future__ import annotations

from grpc_health.v1 import health_pb2

from devtools.local_stack import health_status as status_of
from devtools.local_stack import wait_for_health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# What status_of reads while the server takes no RPC at all (stopped, or stopping).
NO_ANSWER = health_pb2.HealthCheckResponse.UNKNOWN

__all__ = ["NOT_SERVING", "NO_ANSWER", "SERVING", "status_of", "wait_for_status", "wait_serving"]


async def wait_for_status(port: int, service: str, wanted: int, timeout_s: float = 10.0) -> None:
    await wait_for_health(port, service, wanted, timeout_s)


async def wait_serving(port: int, service: str, timeout_s: float = 60.0) -> None:
    await wait_for_health(port, service, SERVING, timeout_s)
