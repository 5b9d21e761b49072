"""A bounded soak: many concurrent streams against a frontend and two workers, a worker killed
(SIGKILL) and replaced at a steady pace, every stream checked token by token.

    python -m tests.soak.run --duration 300 --streams 256 --kill-every 20      # make soak

Prints requests admitted, completed, failed by code, tokens lost and duplicated (both must be 0),
time to first token p50/p99 and the longest pause inside a stream (the recovery a caller felt).
Everything runs on loopback and stops by itself; processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from mistral_serve.client import ChatClient
from mistral_serve.frontend.errors import grpc_code
from mistral_serve.frontend.health import READINESS_SERVICE
from mistral_serve.worker.health import READINESS_SERVICE as WORKER_READY
from tests.conftest import REPO, free_port, start_redis
from tests.support.health import wait_serving
from tests.support.requests import chat

TOKENS = 40


@dataclass
class Tally:
    admitted: int = 0
    completed: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens_lost: int = 0
    tokens_duplicated: int = 0
    ttft_s: list[float] = field(default_factory=list)
    longest_pause_s: float = 0.0
    worker_kills: int = 0

    def report(self) -> dict[str, object]:
        ttft = sorted(self.ttft_s)

        def pct(q: float) -> float:
            return round(ttft[min(int(q * len(ttft)), len(ttft) - 1)] * 1000, 1) if ttft else 0.0

        return {
            "admitted": self.admitted,
            "completed": self.completed,
            "failed_by_code": dict(self.failed),
            "tokens_lost": self.tokens_lost,
            "tokens_duplicated": self.tokens_duplicated,
            "ttft_p50_ms": pct(0.5),
            "ttft_p99_ms": pct(0.99),
            "longest_pause_in_a_stream_s": round(self.longest_pause_s, 2),
            "worker_kills": self.worker_kills,
        }


def expected_words(prompt: str) -> list[str]:
    return (prompt.split() + [f"w{i}" for i in range(1, TOKENS + 1)])[:TOKENS]


async def one_stream(client: ChatClient, prompt: str, tally: Tally, timeout_s: float) -> None:
    start = time.monotonic()
    last_at = start
    sequence = 0
    words: list[str] = []
    request = chat(prompt)
    request.sampling.temperature = 0.0
    try:
        async for event in client.stream(request, timeout_s=timeout_s):
            kind = event.WhichOneof("event")
            now = time.monotonic()
            if kind == "started":
                tally.admitted += 1
            elif kind == "delta":
                if sequence == 0:
                    tally.ttft_s.append(now - start)
                else:
                    tally.longest_pause_s = max(tally.longest_pause_s, now - last_at)
                last_at = now
                if event.delta.sequence <= sequence:
                    tally.tokens_duplicated += event.delta.token_count
                    continue
                sequence = event.delta.sequence
                words += event.delta.text.split()
            elif kind == "finished":
                expected = expected_words(prompt)
                tally.tokens_lost += sum(1 for a, b in zip(words, expected, strict=False) if a != b)
                tally.tokens_lost += max(len(expected) - len(words), 0)
                tally.tokens_duplicated += max(len(words) - len(expected), 0)
                tally.completed += 1
            else:
                tally.failed[grpc_code(event.error.code).name] += 1
    except grpc.aio.AioRpcError as error:
        tally.failed[error.code().name] += 1


def spawn(kind: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", f"mistral_serve.{kind}"], env=env, stderr=subprocess.DEVNULL
    )


async def soak(duration_s: float, streams: int, kill_every_s: float, rate: float) -> Tally:
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    redis_server = start_redis(tmp)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MISTRAL_SERVE_REDIS_URL": redis_server.url,
        "MISTRAL_SERVE_ENGINE": "tests.support.scripted_engine:from_env",
        "MISTRAL_SERVE_GRPC_HOST": "127.0.0.1",
        "MISTRAL_SERVE_HEALTH_HOST": "127.0.0.1",
        "MISTRAL_SERVE_METRICS_PORT": "off",
        "MISTRAL_SERVE_HTTP_PORT": "off",
        "MISTRAL_SERVE_MAX_BACKLOG": str(streams * 2),
        "MISTRAL_SERVE_WORKER_MAX_INFLIGHT": str(streams),
        "MISTRAL_SERVE_LEASE_MS": "1500",
        "MISTRAL_SERVE_LOG_FORMAT": "json",
        "SCRIPTED_TOKENS_PER_S": str(rate),
        "SCRIPTED_TOKENS": str(TOKENS),
    }
    port = free_port()
    frontend = spawn("frontend", {**env, "MISTRAL_SERVE_GRPC_PORT": str(port)})

    async def start_worker() -> subprocess.Popen[bytes]:
        health = free_port()
        worker = spawn("worker", {**env, "MISTRAL_SERVE_HEALTH_PORT": str(health)})
        await wait_serving(health, WORKER_READY)
        return worker

    workers = [await start_worker(), await start_worker()]
    tally = Tally()
    try:
        await wait_serving(port, READINESS_SERVICE)
        end = time.monotonic() + duration_s
        async with ChatClient(f"127.0.0.1:{port}", max_attempts=10) as client:

            async def loop(index: int) -> None:
                n = 0
                while time.monotonic() < end:
                    n += 1
                    await one_stream(client, f"soak {index} {n}", tally, timeout_s=60)

            async def killer() -> None:
                while time.monotonic() + kill_every_s < end:
                    await asyncio.sleep(kill_every_s)
                    victim = workers.pop(0)
                    victim.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(victim.wait)
                    tally.worker_kills += 1
                    workers.append(await start_worker())

            await asyncio.gather(killer(), *(loop(i) for i in range(streams)))
    finally:
        for process in [*workers, frontend]:
            process.terminate()
        for process in [*workers, frontend]:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        redis_server.stop()
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--streams", type=int, default=256, help="concurrent streams")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between worker kills")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s of each stream in the engine")
    args = parser.parse_args()
    tally = asyncio.run(soak(args.duration, args.streams, args.kill_every, args.rate))
    print(json.dumps(tally.report(), indent=2))
    if tally.tokens_lost or tally.tokens_duplicated or tally.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
