"""Benchmark 5, fairness within a band: the quiet caller's time to first token alone, beside a noisy
caller sending 10x its rate (each with its own API key: served in turn, fair_queue.py), and beside
the same noisy load sent with the quiet caller's own key (one caller: arrival order, as the queue was
before fair queueing).

One frontend and one worker with the stepped engine and a few slots (`--slots`), so that quiet + noisy
arrive faster than the worker serves them and a noisy backlog builds. Open loops (Poisson arrivals).
Reports quiet TTFT p50/p99 per case and its ratio to quiet alone.

    .venv/bin/python bench/fairness.py [--quiet-rate 3] [--noisy-factor 10] [--duration 5] [--quantum 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import uvloop

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import STEPPED_ENGINE, command_line, machine, markdown_table, stack, write_json, write_table
from bench.loadgen import LoadSpec, grpc_streamer, open_channels, run_load
from mistral_serve.common import keys
from mistral_serve.frontend.auth import key_digest

QUIET, NOISY = "quiet-key", "noisy-key"
CASES = {
    "quiet alone": None,
    "+ noisy, own key (fair)": NOISY,
    "+ noisy, quiet's key (arrival order)": QUIET,
}


async def measure(
    target: str, redis_port: int, noisy_key: str | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Quiet's (and noisy's) summaries of one case; waits first for the queue left by the last one."""
    await _until_queue_empty(redis_port)
    channels = open_channels([target])
    try:
        quiet = LoadSpec(
            rate=args.quiet_rate, duration_s=args.duration, max_tokens=args.tokens, deadline_s=60, drain=False
        )
        runs = [run_load(grpc_streamer(channels, api_key=QUIET), quiet)]
        if noisy_key is not None:
            noisy = LoadSpec(
                rate=args.quiet_rate * args.noisy_factor,
                duration_s=args.duration,
                max_tokens=args.tokens,
                deadline_s=60,
                max_inflight=2048,
                seed=1,
                drain=False,
            )
            runs.append(run_load(grpc_streamer(channels, api_key=noisy_key), noisy))
        results = await asyncio.gather(*runs)
    finally:
        for channel in channels:
            await channel.close()
    return {
        "quiet": results[0].summary(),
        "noisy": results[1].summary() if len(results) > 1 else None,
    }


async def _until_queue_empty(redis_port: int, timeout_s: float = 60.0) -> None:
    """Cut streams of the case before are cancelled; their jobs still pass through the worker."""
    client = aioredis.Redis(port=redis_port)
    try:
        for _ in range(int(timeout_s / 0.1)):
            async with client.pipeline(transaction=False) as pipe:
                for key in keys.waiting_counts("default"):
                    pipe.llen(key)
                for key in keys.request_streams("default"):
                    pipe.xlen(key)
                lengths = await pipe.execute()
            if sum(int(n) for n in lengths) == 0:  # waiting plus running
                return
            await asyncio.sleep(0.1)
        raise SystemExit("the queue did not empty between cases")
    finally:
        await client.aclose()


def table_rows(rows: list[dict[str, Any]]) -> list[list[object]]:
    alone = rows[0]["quiet"]["ttft_ms"]
    out: list[list[object]] = []
    for r in rows:
        q, n = r["quiet"], r["noisy"]
        out.append(
            [
                r["case"],
                f"{q['ttft_ms']['p50']:.1f} / {q['ttft_ms']['p99']:.1f}",
                f"{q['ttft_ms']['p50'] / alone['p50']:.2f} / {q['ttft_ms']['p99'] / alone['p99']:.2f}",
                q["requests"],
                "-" if n is None else f"{n['ttft_ms']['p50']:.1f} / {n['ttft_ms']['p99']:.1f}",
                "-" if n is None else n["requests"],
                sum(q["errors"].values()) + (0 if n is None else sum(n["errors"].values())),
            ]
        )
    return out


TABLE_HEADERS = [
    "case",
    "quiet TTFT p50 / p99 ms",
    "ratio to alone p50 / p99",
    "quiet requests",
    "noisy TTFT p50 / p99 ms",
    "noisy requests",
    "errors",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quiet-rate", type=float, default=3.0, help="quiet caller's requests a second")
    parser.add_argument(
        "--noisy-factor", type=float, default=10.0, help="noisy rate as a multiple of quiet's"
    )
    parser.add_argument("--slots", type=int, default=8, help="the worker's jobs at once")
    parser.add_argument("--rate", type=float, default=50.0, help="engine steps (tokens per stream) a second")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per request")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per case")
    parser.add_argument(
        "--quantum", type=int, default=20, help="MISTRAL_SERVE_FAIR_QUANTUM_TOKENS (20: a request a turn)"
    )
    parser.add_argument("--name", default="fairness", help="result files: bench/results/NAME.{json,md}")
    args = parser.parse_args()

    settings = {
        "MISTRAL_SERVE_ENGINE": STEPPED_ENGINE,
        "STEPPED_TOKENS_PER_S": str(args.rate),
        "STEPPED_TOKENS": str(args.tokens),
        "MISTRAL_SERVE_WORKER_MAX_INFLIGHT": str(args.slots),
        "MISTRAL_SERVE_MAX_BACKLOG": "100000",  # nothing refused: the wait is what is measured
        "MISTRAL_SERVE_API_KEYS": ",".join(key_digest(key) for key in (QUIET, NOISY)),
        "MISTRAL_SERVE_FAIR_QUANTUM_TOKENS": str(args.quantum),
    }
    rows: list[dict[str, Any]] = []
    with stack(args.name, settings=settings) as running:
        for case, noisy_key in CASES.items():
            result = uvloop.run(measure(running.targets[0], running.redis_port, noisy_key, args))
            rows.append({"case": case, **result})
            running.procs.check_alive()
            print(f"{case}: quiet TTFT p99 {result['quiet']['ttft_ms']['p99']:.1f} ms", file=sys.stderr)

    capacity = args.slots * args.rate / args.tokens
    notes = (
        f"Quiet caller {args.quiet_rate:g} requests/s, noisy {args.quiet_rate * args.noisy_factor:g}/s, "
        f"{args.tokens} tokens each; one worker, {args.slots} slots at {args.rate:g} tokens/s a stream "
        f"(serves ~{capacity:.0f} requests/s), so the noisy caller's backlog grows for the "
        f"{args.duration:g} s of each case. A request costs its {args.tokens} max_tokens (no tokenizer: "
        f"prompts count 0); quantum {args.quantum} tokens. TTFT is the wait in the queue plus the first "
        "token."
    )
    table = markdown_table(TABLE_HEADERS, table_rows(rows))
    print(f"\n{notes}\n\n{table}\n")
    write_json(args.name, {"machine": machine(), "command": command_line(), "args": vars(args), "rows": rows})
    write_table(args.name, "Fairness within a band", command_line(), table, notes)


if __name__ == "__main__":
    main()
