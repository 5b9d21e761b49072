"""What every benchmark shares: loopback ports, the stack's processes (stopped by PID), CPU accounting,
percentiles, tables and result files."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LOGS = RESULTS / "logs"
TINY_MODEL = REPO / ".cache" / "tiny-model-text"
# The fast engine of the overhead and scaling benchmarks, loaded by worker processes.
STEPPED_ENGINE = "bench.stepped_engine:from_env"
# Redis for benchmarks: nothing on disk, warnings only.
REDIS_FLAGS = ("--save", "", "--appendonly", "no", "--loglevel", "warning")
READINESS_FRONTEND = "mistral_serve.v1.ChatService"
READINESS_WORKER = "mistral_serve.worker"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_loopback(target: str) -> str:
    """`target` (host:port) if its host is a loopback address; the load tool never leaves this machine."""
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return target
    try:
        if ipaddress.ip_address(host).is_loopback:
            return target
    except ValueError:
        pass
    raise SystemExit(f"refusing target {target!r}: only loopback addresses (127.0.0.0/8, ::1) are allowed")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return (
                f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
            )
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on: cores, load before the run, Python."""
    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=float))
    return path


def write_table(name: str, title: str, command: str, table: str, notes: str = "") -> Path:
    """The table as markdown under bench/results/, for bench/README.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    m = machine()
    text = f"### {title}\n\n`{command}` ({m['when']}, {m['cpus']} CPUs)\n\n{table}\n"
    if notes:
        text += f"\n{notes}\n"
    path.write_text(text)
    return path


@dataclass
class CpuMeter:
    """CPU seconds (user + system) that a set of processes used between `start` and `stop`."""

    pids: dict[str, list[int]]
    _before: dict[str, float] = field(default_factory=dict)
    _wall: float = 0.0

    @staticmethod
    def _cpu(pids: list[int]) -> float:
        total = 0.0
        for pid in pids:
            try:
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def start(self) -> None:
        self._before = {name: self._cpu(pids) for name, pids in self.pids.items()}
        self._wall = time.perf_counter()

    def stop(self) -> dict[str, float]:
        """CPU seconds per group, plus `wall_s`."""
        used = {name: self._cpu(pids) - self._before[name] for name, pids in self.pids.items()}
        used["wall_s"] = time.perf_counter() - self._wall
        return used


class Processes:
    """Child processes of one benchmark: started with logs under bench/results/logs, stopped by PID."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        LOGS.mkdir(parents=True, exist_ok=True)
        log = open(LOGS / f"{self.tag}-{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        self.started.append((name, process))
        return process

    def check_alive(self) -> None:
        for name, process in self.started:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited with {process.returncode}; see {LOGS}/{self.tag}-{name}.log")

    def stop_all(self, grace_s: float = 15.0) -> None:
        """SIGTERM each child by PID (last started first), then SIGKILL whatever outlived the grace,
        its own children included (vLLM's engine core, which would otherwise live on and spin)."""
        descendants: list[psutil.Process] = []
        for _, process in self.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants += psutil.Process(process.pid).children(recursive=True)
        for _, process in reversed(self.started):
            if process.poll() is None:
                process.terminate()
        end = time.monotonic() + grace_s
        for _, process in reversed(self.started):
            try:
                process.wait(timeout=max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        _, alive = psutil.wait_procs(descendants, timeout=max(end - time.monotonic(), 1.0))
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(alive, timeout=10)
        self.started.clear()


def code_root() -> Path | None:
    """The checkout whose service code the stack runs (`BENCH_CODE`), or None for this working tree."""
    raw = os.environ.get("BENCH_CODE")
    return Path(raw) if raw else None


def code_path(root: Path) -> list[str]:
    """PYTHONPATH entries that make `mistral_serve` come from `root` (they win over the editable install)."""
    return [str(root / part) for part in ("common", "service", "worker", "client")]


def snapshot(rev: str = "HEAD") -> tuple[Path, str]:
    """A copy of commit `rev` with its generated protobuf code, under .cache/bench-code/<sha>.

    Benchmarks run the stack from a commit, not from a working tree that others edit meanwhile."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    root = REPO / ".cache" / "bench-code" / sha
    if not (root / "common" / "mistral_serve" / "v1" / "chat_pb2.py").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        protos = sorted(str(p.relative_to(root / "protos")) for p in (root / "protos").rglob("*.proto"))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-I",
                "protos",
                "--python_out=common",
                "--grpc_python_out=common",
                *protos,
            ],
            cwd=root,
            check=True,
        )
    return root, sha


def base_env() -> dict[str, str]:
    """Environment of the stack's processes: service code from `code_root()`, bench/ importable."""
    env = dict(os.environ)
    root = code_root()
    paths = [*(code_path(root) if root else []), str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def vllm_env(env: dict[str, str]) -> dict[str, str]:
    """vLLM on this CPU, offline, with caches in the tree (the same values as tests/engine/vllm_env.py)."""
    cache = REPO / ".cache"
    (cache / "vllm-rpc").mkdir(parents=True, exist_ok=True)
    return {
        **env,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "VLLM_RPC_BASE_PATH": str(cache / "vllm-rpc"),
        "HF_HOME": str(cache / "hf"),
    }


@dataclass
class Stack:
    """redis-server, frontends and workers on loopback, as separate processes."""

    procs: Processes
    redis_port: int
    frontend_ports: list[int] = field(default_factory=list)
    worker_health_ports: list[int] = field(default_factory=list)
    frontend_pids: list[int] = field(default_factory=list)
    worker_pids: list[int] = field(default_factory=list)
    redis_pid: int = 0

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.frontend_ports]

    def worker_engine_pids(self) -> list[int]:
        """vLLM's engine-core children of the workers (empty for in-process engines)."""
        pids: list[int] = []
        for pid in self.worker_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
        return pids


@contextmanager
def stack(
    tag: str,
    *,
    frontends: int = 1,
    workers: int = 1,
    settings: dict[str, str] | None = None,
    ready_timeout_s: float = 180.0,
) -> Iterator[Stack]:
    """Start Redis, `frontends` frontends and `workers` workers with `settings` (env); stop them on exit."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is missing (scripts/install_system_deps.sh installs it)")
    procs = Processes(tag)
    redis_port = free_port()
    env = {**base_env(), "MISTRAL_SERVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", **(settings or {})}
    env.setdefault("MISTRAL_SERVE_GRPC_HOST", "127.0.0.1")
    env.setdefault("MISTRAL_SERVE_HEALTH_HOST", "127.0.0.1")
    env.setdefault("MISTRAL_SERVE_LOG_FORMAT", "json")
    # Streams still open at the end are cut anyway: stop within the Processes grace, not after 120 s.
    env.setdefault("MISTRAL_SERVE_DRAIN_GRACE_S", "5")
    # Prometheus metrics stay on (their cost is part of the stack) on a free port per process.
    env.setdefault("MISTRAL_SERVE_METRICS_PORT", "0")
    env.setdefault("MISTRAL_SERVE_HTTP_PORT", "0")
    out = Stack(procs, redis_port)
    try:
        redis = procs.spawn(
            "redis",
            [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", *REDIS_FLAGS],
        )
        out.redis_pid = redis.pid
        for i in range(frontends):
            port = free_port()
            p = procs.spawn(
                f"frontend{i}",
                [sys.executable, "-m", "mistral_serve.frontend"],
                {**env, "MISTRAL_SERVE_GRPC_PORT": str(port)},
            )
            out.frontend_ports.append(port)
            out.frontend_pids.append(p.pid)
        for i in range(workers):
            port = free_port()
            p = procs.spawn(
                f"worker{i}",
                [sys.executable, "-m", "mistral_serve.worker"],
                {**env, "MISTRAL_SERVE_HEALTH_PORT": str(port), "MISTRAL_SERVE_WORKER_NAME": f"w{i}"},
            )
            out.worker_health_ports.append(port)
            out.worker_pids.append(p.pid)
        checks = [(p, READINESS_FRONTEND) for p in out.frontend_ports]
        checks += [(p, READINESS_WORKER) for p in out.worker_health_ports]
        asyncio.run(wait_all_serving(checks, ready_timeout_s, procs))
        yield out
    finally:
        procs.stop_all()


async def wait_all_serving(checks: list[tuple[int, str]], timeout_s: float, procs: Processes) -> None:
    end = time.monotonic() + timeout_s
    for port, service in checks:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                procs.check_alive()
                if time.monotonic() > end:
                    raise SystemExit(f"{service} on port {port} was not ready within {timeout_s:.0f}s")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)


def command_line() -> str:
    """How this benchmark was started, for the tables."""
    argv = [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
    rel = [a.replace(str(REPO) + "/", "") for a in argv]
    return ".venv/bin/python " + " ".join(rel)
