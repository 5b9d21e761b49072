"""The one launcher of a local stack: a real redis-server, frontends and workers as child processes.

Tests, benchmarks (bench/common.py) and `make run` (scripts/run_stack.py) all start their stack here.
Frontends and workers bind port 0 and report the ports they bound through MISTRAL_SERVE_PORT_FILE
(mistral_serve.common.ports), so no port is picked here and handed on; only redis-server, which cannot
report one, gets a free port picked here and is started again on another if it lost the race. Every
child is stopped by its PID, its own children (vLLM's engine core) included.

It lives in devtools/, beside tests/ and bench/ in the checkout, not in a `mistral_serve` package: it
spawns redis-server and uses psutil, which the service images do not ship, and all three users run
from the checkout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.backoff import NoBackoff
from redis.retry import Retry

from mistral_serve.common.ports import PORT_FILE_ENV
from mistral_serve.frontend.health import READINESS_SERVICE as FRONTEND_READINESS
from mistral_serve.worker.health import READINESS_SERVICE as WORKER_READINESS

# Redis for a local stack: nothing on disk, warnings only.
REDIS_FLAGS = ("--save", "", "--appendonly", "no", "--loglevel", "warning")
# Every port a frontend or worker binds, at 0: the kernel picks, the process reports.
PORT_ZERO = {
    "MISTRAL_SERVE_GRPC_HOST": "127.0.0.1",
    "MISTRAL_SERVE_GRPC_PORT": "0",
    "MISTRAL_SERVE_HEALTH_HOST": "127.0.0.1",
    "MISTRAL_SERVE_HEALTH_PORT": "0",
    "MISTRAL_SERVE_METRICS_HOST": "127.0.0.1",
    "MISTRAL_SERVE_METRICS_PORT": "0",
    "MISTRAL_SERVE_HTTP_HOST": "127.0.0.1",
    "MISTRAL_SERVE_HTTP_PORT": "0",
}


class StackError(RuntimeError):
    """A child of the stack exited, or did not get ready in time."""


def free_port() -> int:
    """A port free now, for programs that cannot bind port 0 and report it (redis-server, vllm serve)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """One child process; `ports` are those it reported (grpc, http, health, metrics)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path | None = None
    port_file: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            where = f"; see {self.log}" if self.log else ""
            raise StackError(f"{self.name} exited with {self.process.returncode}{where}")

    async def wait_ports(self, timeout_s: float) -> dict[str, int]:
        """The ports the child reported, once its port file is there."""
        assert self.port_file is not None, f"{self.name} reports no ports"
        end = time.monotonic() + timeout_s
        while not self.port_file.exists():
            self.check_alive()
            if time.monotonic() > end:
                raise StackError(f"{self.name} reported no ports within {timeout_s:.0f}s")
            await asyncio.sleep(0.02)
        self.ports = {name: int(port) for name, port in json.loads(self.port_file.read_text()).items()}
        return self.ports


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

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does, with no chance to save anything."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def start_redis(
    data_dir: Path, port: int | None = None, *, log: Path | None = None, flags: Sequence[str] = ()
) -> RedisServer:
    """A redis-server on loopback, answering PING. On `port` (a restart on the same address), else on a
    free port, picked again when another process took it first. `flags` come after the defaults and
    win over them (`--appendonly yes` for a Redis that keeps its data across a restart)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server is missing: run scripts/install_system_deps.sh (make setup does)")
    for _ in range(1 if port else 5):
        chosen = port or free_port()
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(chosen),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data_dir),
                *REDIS_FLAGS,
                *flags,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            process_group=0,  # see LocalStack.spawn
        )
        if log:
            out.close()  # type: ignore[union-attr]
        if _answers(chosen, process):
            return RedisServer(chosen, process)
        process.kill()
        process.wait()
    raise StackError(f"redis-server did not start on {'port ' + str(port) if port else 'a free port'}")


def _answers(port: int, process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> bool:
    """Whether the redis-server `process` answers on `port`: the one answering must be this process,
    not whoever else holds the port (then `process` exits, having failed to bind)."""
    # No retries inside the client: each probe is short, and this loop is the retry.
    client = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    end = time.monotonic() + timeout_s
    try:
        while time.monotonic() < end and process.poll() is None:
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                info: dict[str, Any] = client.info("server")  # type: ignore[assignment]  # sync client
                return int(info["process_id"]) == process.pid
            time.sleep(0.025)
        return False
    finally:
        client.close()


async def health_status(port: int, service: str) -> int:
    """The grpc.health.v1 status of `service` on 127.0.0.1:`port`; UNKNOWN (0) while nothing answers."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
        except grpc.aio.AioRpcError:
            return int(health_pb2.HealthCheckResponse.UNKNOWN)
        return int(reply.status)


async def wait_for_health(
    port: int, service: str, wanted: int, timeout_s: float, *, alive: Callable[[], None] | None = None
) -> None:
    """Until `service` on 127.0.0.1:`port` reports `wanted`; `alive` raises if a process it needs died."""
    end = time.monotonic() + timeout_s
    while (current := await health_status(port, service)) != wanted:
        if alive is not None:
            alive()
        if time.monotonic() > end:
            raise StackError(
                f"{service!r} on port {port} stayed {current}, wanted {wanted} ({timeout_s:.0f}s)"
            )
        await asyncio.sleep(0.05)


class LocalStack:
    """Children of one stack, each started with `env` plus its own settings and stopped by PID."""

    def __init__(self, env: Mapping[str, str], run_dir: Path, *, log_dir: Path | None = None) -> None:
        self.env = dict(env)
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.children: list[Child] = []

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Child:
        """Any child process: output to `log_dir/<name>.log` when a log folder is set, else inherited."""
        log = None if self.log_dir is None else self.log_dir / f"{name}.log"
        out = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = open(log, "wb")  # noqa: SIM115 - the child keeps it
        # A process group of its own: Ctrl-C reaches the launcher only, which then stops the children
        # in order; vLLM's engine core must not die of the SIGINT before its worker drained.
        process = subprocess.Popen(
            argv,
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            process_group=0,
        )
        if out is not None:
            out.close()
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def start_redis(self) -> RedisServer:
        """A redis-server of this stack, stopped with it (last, since the others still need it)."""
        log = None if self.log_dir is None else self.log_dir / "redis.log"
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        server = start_redis(self.run_dir, log=log)
        self.children.append(Child("redis", server.process, log))
        return server

    def start(self, kind: str, name: str | None = None, **settings: str) -> Child:
        """`python -m mistral_serve.<kind>` (frontend or worker) with every port at 0 and a port file.

        `settings` are environment variables; a lower-case key is a MISTRAL_SERVE_ setting
        (`drain_grace_s="1"`), an upper-case one is taken as it is (`SCRIPTED_TOKENS="40"`)."""
        name = name or f"{kind}{sum(c.name.startswith(kind) for c in self.children)}"
        port_file = self.run_dir / f"{name}-{len(self.children)}.ports"
        port_file.unlink(missing_ok=True)
        env = {**self.env, **PORT_ZERO, PORT_FILE_ENV: str(port_file)}
        env.update(
            {key if key.isupper() else f"MISTRAL_SERVE_{key.upper()}": v for key, v in settings.items()}
        )
        child = self.spawn(name, [sys.executable, "-m", f"mistral_serve.{kind}"], env)
        child.port_file = port_file
        return child

    async def ready(self, child: Child, timeout_s: float = 60.0) -> dict[str, int]:
        """The child's ports once it reported them and its readiness is SERVING."""
        end = time.monotonic() + timeout_s
        ports = await child.wait_ports(timeout_s)
        if "grpc" in ports:  # a frontend: readiness on its gRPC port, or the plain health port with TLS
            port, service = ports.get("health", ports["grpc"]), FRONTEND_READINESS
        else:
            port, service = ports["health"], WORKER_READINESS
        await wait_for_health(
            port,
            service,
            health_pb2.HealthCheckResponse.SERVING,
            end - time.monotonic(),
            alive=self.check_alive,
        )
        return ports

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()

    async def ready_all(self, children: list[Child], timeout_s: float = 60.0) -> None:
        """Each of `children` reported its ports and is SERVING; an exit of any child stops the wait."""
        end = time.monotonic() + timeout_s
        for child in children:
            self.check_alive()
            await self.ready(child, max(end - time.monotonic(), 1.0))

    def stop_all(self, grace_s: float = 15.0, *, sig: int = signal.SIGTERM) -> None:
        """Stop each child by PID, last started first, each gone before the next gets `sig` (workers
        drain while frontends and Redis still serve them); SIGKILL whatever outlives the grace, and
        then the children's own children (vLLM's engine core, which would otherwise live on and spin)."""
        descendants: list[psutil.Process] = []
        for child in self.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants += psutil.Process(child.pid).children(recursive=True)
        end = time.monotonic() + grace_s
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(sig)
            try:
                child.process.wait(timeout=max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(timeout=10)
        _, alive = psutil.wait_procs(descendants, timeout=max(end - time.monotonic(), 1.0))
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        self.children.clear()
