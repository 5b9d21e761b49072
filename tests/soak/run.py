"""A bounded soak: many concurrent streams against a frontend and two workers, a worker killed
(SIGKILL) and replaced at a steady pace, every stream checked token by token at the raw gRPC stub
(no client library that would drop a resent delta for us).

    python -m tests.soak.run --duration 300 --streams 256 --kill-every 20      # make soak

The run is bounded by its count of kills (duration / kill-every - 1): the load stops once the last
replacement worker is serving and has finished streams of its own.

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
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from devtools.local_stack import Child, LocalStack
from mistral_serve.frontend.errors import grpc_code
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import REPO
from tests.support.requests import chat
from tests.support.waiting import until

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


async def one_stream(
    stub: chat_pb2_grpc.ChatServiceAsyncStub, prompt: str, tally: Tally, timeout_s: float
) -> None:
    start = time.monotonic()
    last_at = start
    sequence = 0
    words: list[str] = []
    request = chat(prompt)
    request.sampling.temperature = 0.0
    try:
        async for event in stub.ChatStream(chat_pb2.ChatStreamRequest(request=request), timeout=timeout_s):
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


async def soak(kills: int, streams: int, kill_every_s: float, rate: float) -> Tally:
    """`kills` worker kills, at least `kill_every_s` apart and each after streams finished since the
    last one (so that every kill hits a worker under load), with `streams` streams running throughout."""
    launcher = LocalStack(
        {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "MISTRAL_SERVE_ENGINE": "tests.support.scripted_engine:from_env",
            "MISTRAL_SERVE_MAX_BACKLOG": str(streams * 2),
            "MISTRAL_SERVE_WORKER_MAX_INFLIGHT": str(streams),
            "MISTRAL_SERVE_LEASE_MS": "1500",
            "MISTRAL_SERVE_LOG_FORMAT": "json",
            "SCRIPTED_TOKENS_PER_S": str(rate),
            "SCRIPTED_TOKENS": str(TOKENS),
        },
        Path(tempfile.mkdtemp(prefix="soak-")),
    )
    tally = Tally()
    try:
        launcher.env["MISTRAL_SERVE_REDIS_URL"] = launcher.start_redis().url
        frontend = launcher.start("frontend", metrics_port="off")

        async def start_worker() -> Child:
            worker = launcher.start("worker", metrics_port="off")
            await launcher.ready(worker)
            return worker

        workers = [await start_worker(), await start_worker()]
        await launcher.ready(frontend)
        load_done = asyncio.Event()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.ports['grpc']}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)

            async def loop(index: int) -> None:
                n = 0
                while not load_done.is_set():
                    n += 1
                    await one_stream(stub, f"soak {index} {n}", tally, timeout_s=60)

            async def killer() -> None:
                for _ in range(kills + 1):  # the last round only lets the last replacement finish streams
                    completed = tally.completed
                    await asyncio.sleep(kill_every_s)  # the pace of the kills, not a wait for anything
                    await until(lambda: tally.completed > completed, timeout_s=120)  # noqa: B023
                    if tally.worker_kills == kills:
                        break
                    victim = workers.pop(0)
                    victim.process.kill()
                    await asyncio.to_thread(victim.process.wait)
                    tally.worker_kills += 1
                    workers.append(await start_worker())
                load_done.set()

            await asyncio.gather(killer(), *(loop(i) for i in range(streams)))
    finally:
        launcher.stop_all(grace_s=60)
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
    kills = max(int(args.duration // args.kill_every) - 1, 1)
    tally = asyncio.run(soak(kills, args.streams, args.kill_every, args.rate))
    print(json.dumps(tally.report(), indent=2))
    if tally.tokens_lost or tally.tokens_duplicated or tally.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
