"""The in-chart Redis's command line, as the chart renders it, run by a real redis-server on loopback.

Rendering proves the chart writes the flags; this proves they do what the chart promises: a password
is required, the probe's `redis-cli` gets in with REDISCLI_AUTH, eviction is off (so both processes'
startup check passes), and the AOF brings a queued request back after a SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import pytest
import redis

from mistral_serve.common import keys
from mistral_serve.common.redis_client import RedisConnection, connect, refuse_evicting_redis
from tests.chart.test_chart import CHART_DIR, FULLNAME, container, one, render
from tests.conftest import free_port
from tests.support.waiting import until_sync

PASSWORD = "s3cret-from-the-secret"


@pytest.fixture(scope="module")
def rendered_redis() -> Iterator[tuple[list[str], dict[str, str], list[str]]]:
    """The Redis container's args, its env var names, and its readiness probe command."""
    with helm.Chart.load(CHART_DIR) as chart:
        redis_container = container(one(render(chart, {}), "Deployment", f"{FULLNAME}-redis"))
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in redis_container["env"]}
    yield redis_container["args"], env, redis_container["readinessProbe"]["exec"]["command"]


def command_line(args: list[str], port: int, data_dir: Path) -> list[str]:
    """The rendered args on this machine: the kubelet's $(VAR) expansion, a loopback port, a temp /data."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (apt-get install redis-server)"
    out = [a.replace("$(REDIS_PASSWORD)", PASSWORD) for a in args]
    out[out.index("--port") + 1] = str(port)
    out[out.index("--dir") + 1] = str(data_dir)
    return [binary, *out, "--bind", "127.0.0.1"]


def start(argv: list[str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=PASSWORD)
    try:
        until_sync(client.ping, "redis-server answering", timeout_s=10, ignoring=(redis.ConnectionError,))
    except RuntimeError:
        process.kill()
        pytest.fail(f"redis-server with the chart's args did not answer: {argv}")
    return process


@pytest.fixture
def chart_redis(
    rendered_redis: tuple[list[str], dict[str, str], list[str]], tmp_path: Path
) -> Iterator[tuple[list[str], int]]:
    port = free_port()
    argv = command_line(rendered_redis[0], port, tmp_path)
    process = start(argv, port)
    yield argv, port
    process.kill()
    process.wait(timeout=10)


def test_chart_redis_refuses_callers_without_the_password(chart_redis: tuple[list[str], int]) -> None:
    _, port = chart_redis
    # Raw RESP, not redis-py, whose retries would turn a refusal into seconds of waiting.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(256).startswith(b"-NOAUTH")
        sock.sendall(b"AUTH wrong\r\n")
        assert sock.recv(256).startswith(b"-WRONGPASS")
        sock.sendall(f"AUTH {PASSWORD}\r\nPING\r\n".encode())
        reply = b""
        while not reply.endswith(b"+PONG\r\n"):
            reply += sock.recv(256)
        assert reply == b"+OK\r\n+PONG\r\n"


def test_chart_redis_probe_authenticates_from_its_env(
    rendered_redis: tuple[list[str], dict[str, str], list[str]], chart_redis: tuple[list[str], int]
) -> None:
    _, env, probe = rendered_redis
    assert "REDISCLI_AUTH" in env
    _, port = chart_redis
    probe = list(probe)
    probe[probe.index("-p") + 1] = str(port)
    base = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    ok = subprocess.run(probe, env={**base, "REDISCLI_AUTH": PASSWORD}, capture_output=True, text=True)
    assert ok.stdout.strip() == "PONG"
    refused = subprocess.run(probe, env=base, capture_output=True, text=True)
    assert "PONG" not in refused.stdout


async def test_chart_redis_passes_the_processes_eviction_check(chart_redis: tuple[list[str], int]) -> None:
    _, port = chart_redis
    client = connect(RedisConnection(f"redis://127.0.0.1:{port}/0", PASSWORD))
    try:
        await refuse_evicting_redis(client)  # raises EvictingRedis (SystemExit) on any other policy
        assert await client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        await client.aclose()


def test_chart_redis_keeps_queued_requests_across_a_sigkill(
    rendered_redis: tuple[list[str], dict[str, str], list[str]], tmp_path: Path
) -> None:
    port = free_port()
    argv = command_line(rendered_redis[0], port, tmp_path)
    process = start(argv, port)
    stream = keys.request_stream("default")
    client = redis.Redis(port=port, password=PASSWORD)
    entry = client.xadd(stream, {keys.REQUEST_FIELD: b"queued request"})
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    process = start(argv, port)  # same data dir: the AOF is all it has to go on
    try:
        assert client.xrange(stream) == [(entry, {keys.REQUEST_FIELD.encode(): b"queued request"})]
    finally:
        process.kill()
        process.wait(timeout=10)
