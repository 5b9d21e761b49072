"""Both processes refuse a Redis that may evict keys: an evicted queue entry or event stream is a
request lost without an error. Real redis-server, real `python -m mistral_serve.<kind>` processes."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from mistral_serve.common.redis_client import RedisConnection, connect, refuse_evicting_redis
from mistral_serve.frontend.health import READINESS_SERVICE as FRONTEND_READINESS
from mistral_serve.worker.health import READINESS_SERVICE as WORKER_READINESS
from tests.conftest import RedisServer, free_port, start_redis
from tests.support.health import wait_serving

KINDS = {"frontend": FRONTEND_READINESS, "worker": WORKER_READINESS}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, since the test changes its configuration."""
    server = start_redis(tmp_path)
    yield server
    server.stop()


def spawn(kind: str, redis_url: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", f"mistral_serve.{kind}"],
        env={
            **env,
            "MISTRAL_SERVE_REDIS_URL": redis_url,
            "MISTRAL_SERVE_GRPC_HOST": "127.0.0.1",
            "MISTRAL_SERVE_HEALTH_HOST": "127.0.0.1",
            "MISTRAL_SERVE_GRPC_PORT" if kind == "frontend" else "MISTRAL_SERVE_HEALTH_PORT": str(port),
            "MISTRAL_SERVE_METRICS_PORT": "0",
            "MISTRAL_SERVE_HTTP_PORT": "0",
            "MISTRAL_SERVE_METRICS_HOST": "127.0.0.1",
            "MISTRAL_SERVE_ENGINE": "tests.support.scripted_engine:from_env",
            "MISTRAL_SERVE_LOG_FORMAT": "text",
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, port


def stop(process: subprocess.Popen[str]) -> str:
    """Stop a process that is still running (SIGTERM, drain) and return what it wrote to stderr."""
    process.terminate()
    _, stderr = process.communicate(timeout=30)
    return stderr


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_process_refuses_to_start_on_an_evicting_redis(
    own_redis: RedisServer, subprocess_env: dict[str, str], kind: str
) -> None:
    redis.Redis(port=own_redis.port).config_set("maxmemory-policy", "allkeys-lru")
    process, _ = spawn(kind, own_redis.url, subprocess_env)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    last_line = stderr.strip().splitlines()[-1]
    assert "maxmemory-policy is 'allkeys-lru'" in last_line
    assert "Set maxmemory-policy noeviction" in last_line
    assert "Traceback" not in stderr


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_process_starts_on_a_noeviction_redis(
    own_redis: RedisServer, subprocess_env: dict[str, str], kind: str
) -> None:
    assert redis.Redis(port=own_redis.port).config_get("maxmemory-policy") == {
        "maxmemory-policy": "noeviction"
    }
    process, port = spawn(kind, own_redis.url, subprocess_env)
    try:
        await wait_serving(port, KINDS[kind])
    finally:
        stderr = stop(process)
    assert process.returncode == 0, stderr
    assert "maxmemory-policy" not in stderr


async def test_frontend_warns_and_starts_where_config_is_denied(
    own_redis: RedisServer, subprocess_env: dict[str, str]
) -> None:
    # What a managed Redis does: CONFIG is denied to the service's user.
    admin = redis.Redis(port=own_redis.port)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    admin.execute_command("ACL", "SETUSER", "default", "on", "nopass", "+@all", "-config")  # type: ignore[no-untyped-call]
    process, port = spawn("frontend", own_redis.url, subprocess_env)
    try:
        await wait_serving(port, FRONTEND_READINESS)
    finally:
        stderr = stop(process)
    assert process.returncode == 0, stderr
    assert "cannot read Redis maxmemory-policy" in stderr
    assert "make sure it is noeviction" in stderr


async def test_check_warns_and_returns_when_redis_does_not_answer(caplog: pytest.LogCaptureFixture) -> None:
    # Redis not up yet (pods start in any order): readiness reports it; startup must not hang or die.
    client = connect(RedisConnection(f"redis://127.0.0.1:{free_port()}/0"))
    try:
        with caplog.at_level(logging.WARNING, logger="mistral_serve.common.redis_client"):
            await refuse_evicting_redis(client, timeout_s=2.0)
    finally:
        await client.aclose()
    assert "maxmemory-policy not checked" in caplog.text
