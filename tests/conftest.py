"""Fixtures that start real servers: redis-server on a free loopback port, frontends and workers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def start_redis(tmp_dir: Path, port: int | None = None) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
    port = port or free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_dir),
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            if client.ping():
                return RedisServer(port, process)
        except redis.ConnectionError:
            time.sleep(0.025)
    process.kill()
    pytest.fail(f"redis-server did not answer on port {port}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
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
    """Frontends and workers as real processes (`python -m mistral_serve.<kind>`), stopped by PID."""

    def __init__(self, redis_url: str, env: dict[str, str]) -> None:
        self.redis_url = redis_url
        self.env = env
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, kind: str, **settings: str) -> tuple[subprocess.Popen[bytes], int]:
        """Start a frontend or worker; return it and its gRPC (frontend) or health (worker) port."""
        port = free_port()
        env = {
            **self.env,
            "MISTRAL_SERVE_REDIS_URL": self.redis_url,
            "MISTRAL_SERVE_GRPC_HOST": "127.0.0.1",
            "MISTRAL_SERVE_HEALTH_HOST": "127.0.0.1",
            "MISTRAL_SERVE_GRPC_PORT" if kind == "frontend" else "MISTRAL_SERVE_HEALTH_PORT": str(port),
            "MISTRAL_SERVE_ENGINE": "tests.support.scripted_engine:from_env",
            "MISTRAL_SERVE_LOG_FORMAT": "json",
            # A free port each, so that processes never collide on the 9090/9091 defaults.
            "MISTRAL_SERVE_METRICS_PORT": "0",
            "MISTRAL_SERVE_HTTP_PORT": "0",
            "MISTRAL_SERVE_METRICS_HOST": "127.0.0.1",
        }
        env.update(
            {
                key if key.isupper() else f"MISTRAL_SERVE_{key.upper()}": value
                for key, value in settings.items()
            }
        )
        process = subprocess.Popen([sys.executable, "-m", f"mistral_serve.{kind}"], env=env)
        self.started.append(process)
        return process, port

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
        for process in self.started:
            process.wait(timeout=30)


@pytest.fixture
def processes(redis_url: str, subprocess_env: dict[str, str]) -> Iterator[Processes]:
    started = Processes(redis_url, subprocess_env)
    yield started
    started.stop_all()
