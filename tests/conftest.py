"""Fixtures that start real servers: redis-server on loopback, frontends and workers as processes.

The processes come from devtools.local_stack, the launcher that bench/ and `make run` use too: they
bind port 0 and report the ports they bound."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.local_stack import Child, LocalStack, RedisServer, StackError, free_port, start_redis

REPO = Path(__file__).resolve().parent.parent
SCRIPTED_ENGINE = "tests.support.scripted_engine:from_env"

__all__ = ["REPO", "Processes", "RedisServer", "free_port", "start_redis"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        server = start_redis(tmp_path_factory.mktemp("redis"))
    except StackError as exc:
        pytest.fail(f"{exc} (apt-get install redis-server; .ci/run installs it)")
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session's redis-server, emptied for this test."""
    redis.Redis(port=redis_server.port).flushall()
    yield redis_server.url


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for frontend/worker processes: tests/ importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Processes:
    """Frontends and workers as real processes with the scripted engine, killed by PID at the end."""

    def __init__(self, redis_url: str, env: dict[str, str], run_dir: Path) -> None:
        self.redis_url = redis_url
        self.launcher = LocalStack(env, run_dir)

    async def start(self, kind: str, **settings: str) -> Child:
        """A frontend or worker, once it reported the ports it bound (`child.ports`)."""
        child = self.launcher.start(
            kind,
            **{"redis_url": self.redis_url, "engine": SCRIPTED_ENGINE, "log_format": "json", **settings},
        )
        await child.wait_ports(timeout_s=60)
        return child

    async def spawn(self, kind: str, **settings: str) -> tuple[subprocess.Popen[bytes], int]:
        """Start a frontend or worker; return it and its gRPC (frontend) or health (worker) port."""
        child = await self.start(kind, **settings)
        return child.process, child.ports["grpc" if kind == "frontend" else "health"]

    def stop_all(self) -> None:
        self.launcher.stop_all(grace_s=30, sig=signal.SIGKILL)


@pytest.fixture
def processes(redis_url: str, subprocess_env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    started = Processes(redis_url, subprocess_env, tmp_path)
    yield started
    started.stop_all()
