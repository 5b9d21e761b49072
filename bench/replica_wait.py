"""What WAIT costs per request: the same sequential and concurrent streams through a frontend and a
worker (in-process, scripted engine) on a real primary + replica on loopback, with
MISTRAL_SERVE_REDIS_WAIT_REPLICAS 0 and 1. Prints the time per request and the ratio; asserts nothing.

    .venv/bin/python bench/replica_wait.py --requests 200 --concurrency 1 16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mistral_serve.frontend.server import start_frontend
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.worker.app import start_worker
from mistral_serve.worker.settings import WorkerSettings
from tests.support.raw_stream import raw_events, start
from tests.support.redis_topologies import start_sentinels
from tests.support.requests import chat
from tests.support.scripted_engine import ScriptedEngine


async def per_request_s(url: str, wait_replicas: int, requests: int, concurrency: int) -> float:
    """Wall time per request (requests / concurrency in a row each), median of three rounds."""
    common = {"redis_url": url, "redis_wait_replicas": wait_replicas, "metrics_port": None}
    frontend = await start_frontend(
        FrontendSettings(grpc_host="127.0.0.1", grpc_port=0, http_port=None, **common)  # type: ignore[arg-type]
    )
    worker = await start_worker(
        WorkerSettings(health_host="127.0.0.1", health_port=0, block_ms=200, **common),  # type: ignore[arg-type]
        ScriptedEngine(tokens_per_s=0),
    )

    async def one_lane(n: int) -> None:
        for _ in range(n):
            events = await raw_events(frontend.port, start(chat("wait?", max_tokens=4)))
            assert events[-1].WhichOneof("event") == "finished", events[-1]

    rounds = []
    try:
        await one_lane(5)  # warm-up: scripts loaded, connections open
        for _ in range(3):
            began = time.perf_counter()
            await asyncio.gather(*(one_lane(requests // concurrency) for _ in range(concurrency)))
            rounds.append((time.perf_counter() - began) / (requests // concurrency * concurrency))
    finally:
        await worker.stop(grace_s=0)
        await frontend.stop(grace_s=0)
    return statistics.median(rounds)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    topology = start_sentinels(Path(tempfile.mkdtemp(prefix="replica-wait-")), sentinels=0)
    url = f"redis://127.0.0.1:{topology.ports['primary']}/0"
    try:
        print("| concurrency | WAIT 0 (ms/request) | WAIT 1 (ms/request) | ratio |")
        print("|---|---|---|---|")
        for concurrency in args.concurrency:
            off = await per_request_s(url, 0, args.requests, concurrency)
            on = await per_request_s(url, 1, args.requests, concurrency)
            print(f"| {concurrency} | {off * 1000:.2f} | {on * 1000:.2f} | {on / off:.2f} |")
    finally:
        topology.stop()


if __name__ == "__main__":
    asyncio.run(main())
