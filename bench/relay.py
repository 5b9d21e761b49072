"""Relay overhead: the scripted engine read directly in-process vs through frontend -> Redis -> worker.

Both run in the same invocation on the same engine settings, so the ratio is what the gateway costs.
Frontend, worker and redis-server run as separate processes on loopback; the load comes from here.

    .venv/bin/python bench/relay.py [--streams 1 64] [--tokens 200] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mistral_serve.client import ChatClient, user_message  # noqa: E402
from mistral_serve.v1 import chat_pb2  # noqa: E402
from mistral_serve.worker.engine import EngineRequest  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.support.scripted_engine import ScriptedEngine  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def direct(streams: int, tokens: int, rate: float) -> tuple[float, list[float]]:
    engine = ScriptedEngine(tokens_per_s=rate, default_tokens=tokens)
    request = chat_pb2.ChatRequest(messages=[user_message("go")])

    async def one(i: int) -> tuple[int, float]:
        start = time.perf_counter()
        first = 0.0
        count = 0
        async for out in engine.generate(EngineRequest(f"d{i}", request)):
            if not count:
                first = time.perf_counter() - start
            count += len(out.token_ids)
        return count, first

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(streams)))
    elapsed = time.perf_counter() - start
    return sum(c for c, _ in results) / elapsed, [f for _, f in results]


async def through_stack(target: str, streams: int) -> tuple[float, list[float]]:
    request = chat_pb2.ChatRequest(messages=[user_message("go")])

    async with ChatClient(target) as client:

        async def one() -> tuple[int, float]:
            start = time.perf_counter()
            first = 0.0
            count = 0
            async for event in client.stream(request):
                if event.WhichOneof("event") == "delta":
                    if not count:
                        first = time.perf_counter() - start
                    count += event.delta.token_count
            return count, first

        await one()  # warm the channel and the worker
        start = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(streams)))
        elapsed = time.perf_counter() - start
    return sum(c for c, _ in results) / elapsed, [f for _, f in results]


async def wait_serving(port: int, service: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{service} did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    parser.add_argument("--rate", type=float, default=200.0, help="tokens/s of each stream in the engine")
    args = parser.parse_args()

    redis_port, grpc_port, health_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MISTRAL_SERVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "MISTRAL_SERVE_GRPC_HOST": "127.0.0.1",
        "MISTRAL_SERVE_GRPC_PORT": str(grpc_port),
        "MISTRAL_SERVE_HEALTH_HOST": "127.0.0.1",
        "MISTRAL_SERVE_HEALTH_PORT": str(health_port),
        "MISTRAL_SERVE_ENGINE": "tests.support.scripted_engine:from_env",
        "MISTRAL_SERVE_WORKER_MAX_INFLIGHT": "512",
        "MISTRAL_SERVE_MAX_BACKLOG": "1024",
        "SCRIPTED_TOKENS_PER_S": str(args.rate),
        "SCRIPTED_TOKENS": str(args.tokens),
    }
    redis_server = shutil.which("redis-server") or "redis-server"
    children = [
        subprocess.Popen(
            [
                redis_server,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "mistral_serve.frontend"], env=env, stderr=subprocess.DEVNULL
        ),
        subprocess.Popen([sys.executable, "-m", "mistral_serve.worker"], env=env, stderr=subprocess.DEVNULL),
    ]
    try:
        asyncio.run(wait_serving(grpc_port, "mistral_serve.v1.ChatService"))
        asyncio.run(wait_serving(health_port, "mistral_serve.worker"))
        print(f"engine: {args.tokens} tokens per stream at {args.rate:.0f} tokens/s each")
        print(
            f"{'streams':>7} {'direct tok/s':>13} {'stack tok/s':>12} {'ratio':>6} "
            f"{'+TTFT p50 ms':>13} {'+TTFT p99 ms':>13}"
        )
        for streams in args.streams:
            d_rate, d_ttft = asyncio.run(direct(streams, args.tokens, args.rate))
            s_rate, s_ttft = asyncio.run(through_stack(f"127.0.0.1:{grpc_port}", streams))
            added_p50 = (percentile(s_ttft, 0.5) - percentile(d_ttft, 0.5)) * 1000
            added_p99 = (percentile(s_ttft, 0.99) - percentile(d_ttft, 0.99)) * 1000
            print(
                f"{streams:>7} {d_rate:>13.0f} {s_rate:>12.0f} {s_rate / d_rate:>6.3f} "
                f"{added_p50:>13.2f} {added_p99:>13.2f}"
            )
        print(f"(direct TTFT p50 {statistics.median(d_ttft) * 1000:.2f} ms at the last stream count)")
    finally:
        for child in reversed(children):
            child.terminate()
        for child in reversed(children):
            child.wait(timeout=30)


if __name__ == "__main__":
    main()
