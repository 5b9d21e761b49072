"""Readiness follows Redis: SERVING only while it answers; liveness stays up; drain turns it off."""

from __future__ import annotations

from pathlib import Path

from mistral_serve.frontend.health import READINESS_SERVICE
from mistral_serve.worker.health import READINESS_SERVICE as WORKER_READINESS
from tests.conftest import free_port, start_redis
from tests.integration.conftest import Stack
from tests.support.health import NOT_SERVING, SERVING, status_of, wait_for_status


async def test_frontend_is_ready_only_while_redis_answers(stack: Stack, tmp_path: Path) -> None:
    own_redis = start_redis(tmp_path)
    stack.redis_url = own_redis.url
    try:
        frontend = await stack.frontend()
        await wait_for_status(frontend.port, READINESS_SERVICE, SERVING)

        own_redis.stop()
        await wait_for_status(frontend.port, READINESS_SERVICE, NOT_SERVING)
        assert await status_of(frontend.port, "") == SERVING  # alive, just not ready

        own_redis = start_redis(tmp_path, port=own_redis.port)
        await wait_for_status(frontend.port, READINESS_SERVICE, SERVING)
    finally:
        own_redis.stop()


async def test_frontend_without_redis_is_not_ready(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    stack.redis_url = f"redis://127.0.0.1:{port}/0"  # nothing listens there yet
    frontend = await stack.frontend()
    assert await status_of(frontend.port, READINESS_SERVICE) == NOT_SERVING
    # Readiness starts NOT_SERVING anyway: see the health loop decide, both ways, for this frontend.
    late_redis = start_redis(tmp_path, port=port)
    try:
        await wait_for_status(frontend.port, READINESS_SERVICE, SERVING)
    finally:
        late_redis.stop()
    await wait_for_status(frontend.port, READINESS_SERVICE, NOT_SERVING)
    assert await status_of(frontend.port, "") == SERVING  # alive, just not ready


async def test_worker_is_ready_once_engine_loaded_and_not_while_draining(stack: Stack) -> None:
    worker = await stack.worker()
    await wait_for_status(worker.health.port, WORKER_READINESS, SERVING)
    await worker.health.drain()
    assert await status_of(worker.health.port, WORKER_READINESS) == NOT_SERVING


async def test_frontend_drain_reports_not_serving(stack: Stack) -> None:
    frontend = await stack.frontend()
    await wait_for_status(frontend.port, READINESS_SERVICE, SERVING)
    await frontend.health.drain()
    assert await status_of(frontend.port, READINESS_SERVICE) == NOT_SERVING
    assert await status_of(frontend.port, "") == NOT_SERVING
