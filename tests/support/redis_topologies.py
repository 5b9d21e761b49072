"""Redis the way platform teams run it, on loopback: a three-primary Cluster, a TLS-only Redis, and a
primary + replica watched by three sentinels. Ports come from the launcher's one free-port helper
(redis-server cannot bind port 0 and report it); every process is stopped by its PID."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from devtools.local_stack import REDIS_FLAGS, free_port
from tests.support.certs import TestCA
from tests.support.waiting import until_sync


@dataclass
class Topology:
    """The processes of one Redis setup and the settings (lower-case field names) that reach it."""

    settings: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def fields(self) -> dict[str, object]:
        """The settings as SharedSettings fields, for in-process frontends and workers."""
        return {k: tuple(v.split(",")) if k == "redis_sentinels" else v for k, v in self.settings.items()}

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.kill()
        process.wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is missing: run scripts/install_system_deps.sh")
    return path


def _spawn(topology: Topology, name: str, argv: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        topology.processes[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def _until(condition: Callable[..., object], what: str) -> None:
    until_sync(condition, what, ignoring=(redis.RedisError, OSError))


def start_cluster(folder: Path, primaries: int = 3) -> Topology:
    """`primaries` redis-servers with cluster mode on, joined by `redis-cli --cluster create`."""
    topology = Topology({"redis_mode": "cluster"})
    for i in range(primaries):
        port, bus = free_port(), free_port()
        node_dir = folder / f"node{i}"
        node_dir.mkdir(parents=True, exist_ok=True)
        _spawn(
            topology,
            f"node{i}",
            [
                _binary("redis-server"),
                *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir)),
                *("--cluster-enabled", "yes", "--cluster-port", str(bus)),
                *("--cluster-config-file", str(node_dir / "nodes.conf"), *REDIS_FLAGS),
            ],
            node_dir / "redis.log",
        )
        topology.ports[f"node{i}"] = port
    for port in topology.ports.values():
        _until(lambda p=port: redis.Redis(port=p).ping(), f"cluster node {port} did not answer")
    subprocess.run(
        [
            _binary("redis-cli"),
            "--cluster",
            "create",
            *(f"127.0.0.1:{port}" for port in topology.ports.values()),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for port in topology.ports.values():
        _until(
            lambda p=port: _info(redis.Redis(port=p).cluster("info"))["cluster_state"] == "ok",
            f"cluster node {port} never saw the cluster ok",
        )
    first = next(iter(topology.ports.values()))
    topology.settings["redis_url"] = f"redis://127.0.0.1:{first}/0"
    return topology


def start_tls(folder: Path, ca: TestCA) -> Topology:
    """A redis-server that speaks TLS only (--port 0), its certificate from `ca`; clients need none."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = ca.server().write(folder, "redis")
    ca_file = ca.write(folder)
    port = free_port()
    topology = Topology({"redis_url": f"rediss://127.0.0.1:{port}/0", "redis_tls_ca_file": str(ca_file)})
    _spawn(
        topology,
        "redis",
        [
            _binary("redis-server"),
            *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)),
            *("--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca_file)),
            *("--tls-auth-clients", "no", *REDIS_FLAGS),
        ],
        folder / "redis.log",
    )
    topology.ports["redis"] = port
    _until(
        lambda: redis.Redis(port=port, ssl=True, ssl_ca_certs=str(ca_file)).ping(),
        f"TLS redis on {port} did not answer",
    )
    return topology


MASTER = "mymaster"


def start_sentinels(folder: Path, sentinels: int = 3, down_after_ms: int = 1000) -> Topology:
    """A primary, one replica of it, and `sentinels` sentinels (quorum 2) that fail it over."""
    folder.mkdir(parents=True, exist_ok=True)
    topology = Topology({"redis_mode": "sentinel", "redis_sentinel_master": MASTER})
    primary, replica = free_port(), free_port()
    for name, port, extra in (
        ("primary", primary, ()),
        ("replica", replica, ("--replicaof", "127.0.0.1", str(primary))),
    ):
        data = folder / name
        data.mkdir(exist_ok=True)
        _spawn(
            topology,
            name,
            [
                _binary("redis-server"),
                *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), *extra, *REDIS_FLAGS),
            ],
            data / "redis.log",
        )
        topology.ports[name] = port
    _until(
        lambda: _info(redis.Redis(port=replica).info("replication"))["master_link_status"] == "up",
        "the replica never synced",
    )
    addresses = []
    for i in range(sentinels):
        port = free_port()
        conf = folder / f"sentinel{i}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
            f"sentinel down-after-milliseconds {MASTER} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        _spawn(topology, f"sentinel{i}", [_binary("redis-sentinel"), str(conf)], folder / f"sentinel{i}.log")
        topology.ports[f"sentinel{i}"] = port
        addresses.append(f"127.0.0.1:{port}")
    for i in range(sentinels):
        port = topology.ports[f"sentinel{i}"]
        _until(
            lambda p=port: redis.Redis(port=p).execute_command("SENTINEL", "REPLICAS", MASTER),  # type: ignore[no-untyped-call]
            f"sentinel {port} never saw the replica",
        )
    topology.settings["redis_url"] = "redis://mymaster/0"
    topology.settings["redis_sentinels"] = ",".join(addresses)
    return topology


def _info(reply: Any) -> dict[str, Any]:
    """A sync client's INFO-style reply (redis-py types it as maybe-awaitable for both clients)."""
    return dict(reply)


def primary_port(topology: Topology) -> int:
    """The port of the primary the sentinels name now."""
    _, port = redis.Redis(port=topology.ports["sentinel0"]).sentinel_get_master_addr_by_name(MASTER)  # type: ignore[no-untyped-call]
    return int(port)
