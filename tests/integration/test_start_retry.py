"""A job whose start meets a Redis error is retried at once, not left for its lease (issue 15)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.integration.conftest import Stack
from tests.support.raw_stream import raw_events, start
from tests.support.requests import chat, events_text
from tests.support.scripted_engine import ScriptedEngine


async def test_a_start_that_meets_a_redis_error_is_retried_not_left_for_the_lease(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    frontend = await stack.frontend()
    # A lease far beyond the call's timeout: a job left for its lease would fail the test.
    worker = await stack.worker(ScriptedEngine(), lease_ms=600_000)
    real_exists = worker.redis.exists
    failures: list[tuple[Any, ...]] = []

    async def exists_failing_once(*names: Any) -> Any:
        if not failures:
            failures.append(names)
            raise RedisConnectionError("the connection dropped as the job started")
        return await real_exists(*names)

    monkeypatch.setattr(worker.redis, "exists", exists_failing_once)
    events = await raw_events(frontend.port, start(chat("start me")), timeout_s=20)

    assert failures, "the job's start must have met the error"
    assert events[-1].WhichOneof("event") == "finished"
    assert events_text(events).startswith("start me")
