"""Benchmark 3, scaling: 1 vs 2 workers and 1 vs 2 frontend processes on the fast stepped engine,
driven hard enough that the stack, not the engine, is the limit.

Every process of the stack and the load generator share this machine's cores: on a 2-core machine a
second process can only take CPU from the others, so this shows what a second process costs or buys
here, not how the service scales across machines.

    .venv/bin/python bench/scaling.py [--streams 256] [--rate 200] [--duration 8]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import uvloop

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    RESULTS,
    STEPPED_ENGINE,
    CpuMeter,
    command_line,
    machine,
    markdown_table,
    stack,
    write_json,
    write_table,
)
from bench.loadgen import LoadSpec
from bench.overhead import run_stack
from bench.plots import plot_bars

SHAPES = ((1, 1), (1, 2), (2, 1), (2, 2))  # (frontends, workers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--rate", type=float, default=200.0, help="engine tokens/s per stream")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--name", default="scaling")
    args = parser.parse_args()

    demand = args.streams * args.rate
    settings = {
        "MISTRAL_SERVE_ENGINE": STEPPED_ENGINE,
        "STEPPED_TOKENS_PER_S": str(args.rate),
        "STEPPED_TOKENS": str(args.tokens),
        "MISTRAL_SERVE_WORKER_MAX_INFLIGHT": str(args.streams * 2),
        "MISTRAL_SERVE_MAX_BACKLOG": str(args.streams * 4),
    }
    rows: list[dict[str, Any]] = []
    for frontends, workers in SHAPES:
        tag = f"{args.name}-{frontends}f{workers}w"
        with stack(tag, frontends=frontends, workers=workers, settings=settings) as running:
            spec = LoadSpec(
                concurrency=args.streams,
                duration_s=args.duration,
                max_tokens=args.tokens,
                deadline_s=60,
                ramp_s=args.tokens / args.rate,
                drain=False,
            )
            meter = CpuMeter(
                {
                    "frontends": running.frontend_pids,
                    "workers": running.worker_pids,
                    "redis": [running.redis_pid],
                    "client": [os.getpid()],
                }
            )
            meter.start()
            summary = uvloop.run(run_stack(spec, running.targets)).summary()
            cpu = meter.stop()
        wall = cpu.pop("wall_s")
        rows.append(
            {
                "frontends": frontends,
                "workers": workers,
                "summary": summary,
                "cpu_cores": {k: v / wall for k, v in cpu.items()},
            }
        )
        print(
            f"{frontends} frontends, {workers} workers: {summary['tokens_per_s']:.0f} tok/s", file=sys.stderr
        )

    headers = [
        "frontends",
        "workers",
        "tokens/s",
        "of demand",
        "TTFT p50 / p99 ms",
        "CPU cores: frontends / workers / redis / client",
        "errors",
    ]
    table = markdown_table(
        headers,
        [
            [
                r["frontends"],
                r["workers"],
                r["summary"]["tokens_per_s"],
                f"{r['summary']['tokens_per_s'] / demand:.3f}",
                f"{r['summary']['ttft_ms']['p50']:.1f} / {r['summary']['ttft_ms']['p99']:.1f}",
                " / ".join(f"{r['cpu_cores'][k]:.2f}" for k in ("frontends", "workers", "redis", "client")),
                sum(r["summary"]["errors"].values()),
            ]
            for r in rows
        ],
    )
    notes = (
        f"{args.streams} streams, each {args.rate:.0f} tokens/s from the engine: "
        f"a demand of {demand:.0f} tokens/s. "
        f"{os.cpu_count()} CPUs for everything (load generator, Redis, frontends, workers): a second process "
        "adds a second event loop but no CPU, so on this machine it can only help where one process waits "
        "rather than computes."
    )
    print(f"\n{notes}\n\n{table}\n")
    write_json(args.name, {"machine": machine(), "command": command_line(), "args": vars(args), "rows": rows})
    write_table(args.name, "Scaling", command_line(), table, notes)
    plot_bars(
        RESULTS / f"{args.name}.png",
        f"scaling on {os.cpu_count()} CPUs, {args.streams} streams x {args.rate:.0f} tokens/s",
        [f"{r['frontends']}f/{r['workers']}w" for r in rows],
        [
            (
                "tokens/s",
                {"stack": [r["summary"]["tokens_per_s"] for r in rows], "demand": [demand] * len(rows)},
            ),
            ("TTFT p50 ms", {"stack": [r["summary"]["ttft_ms"]["p50"] for r in rows]}),
            ("TTFT p99 ms", {"stack": [r["summary"]["ttft_ms"]["p99"] for r in rows]}),
        ],
    )


if __name__ == "__main__":
    main()
