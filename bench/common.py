"""What every benchmark shares: the stack's processes (devtools.local_stack, stopped by PID), CPU
accounting, percentiles, tables and result files."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from devtools.local_stack import LocalStack, free_port

__all__ = ["free_port"]  # for servers that cannot bind port 0 themselves (vllm serve)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LOGS = RESULTS / "logs"
TINY_MODEL = REPO / ".cache" / "tiny-model-text"
# The fast engine of the overhead and scaling benchmarks, loaded by worker processes.
STEPPED_ENGINE = "bench.stepped_engine:from_env"


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


class Processes(LocalStack):
    """Child processes of one benchmark, with their logs in bench/results/logs/<tag>/."""

    def __init__(self, tag: str) -> None:
        super().__init__(base_env(), Path(tempfile.mkdtemp(prefix=f"bench-{tag}-")), log_dir=LOGS / tag)
        self.tag = tag

    def stop_all(self, grace_s: float = 15.0, *, sig: int = signal.SIGTERM) -> None:
        super().stop_all(grace_s, sig=sig)
        shutil.rmtree(self.run_dir, ignore_errors=True)


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
    # The HTTP door's port of each frontend that reported one (MISTRAL_SERVE_HTTP_PORT, bound at 0).
    http_ports: list[int] = field(default_factory=list)
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
    procs = Processes(tag)
    try:
        redis = procs.start_redis()
        procs.env.update({"MISTRAL_SERVE_REDIS_URL": redis.url, "MISTRAL_SERVE_LOG_FORMAT": "json"})
        # Streams still open at the end are cut anyway: stop within the Processes grace, not after 120 s.
        procs.env["MISTRAL_SERVE_DRAIN_GRACE_S"] = "5"
        procs.env.update(settings or {})
        # Prometheus metrics stay on (their cost is part of the stack), on the port each process binds.
        started = [procs.start("frontend", f"frontend{i}") for i in range(frontends)]
        started += [procs.start("worker", f"worker{i}", worker_name=f"w{i}") for i in range(workers)]
        asyncio.run(procs.ready_all(started, ready_timeout_s))
        out = Stack(procs, redis.port, redis_pid=redis.process.pid)
        for child in started:
            if child.name.startswith("frontend"):
                out.frontend_ports.append(child.ports["grpc"])
                if "http" in child.ports:
                    out.http_ports.append(child.ports["http"])
                out.frontend_pids.append(child.pid)
            else:
                out.worker_health_ports.append(child.ports["health"])
                out.worker_pids.append(child.pid)
        yield out
    finally:
        procs.stop_all()


def command_line() -> str:
    """How this benchmark was started, for the tables."""
    argv = [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
    rel = [a.replace(str(REPO) + "/", "") for a in argv]
    return ".venv/bin/python " + " ".join(rel)
