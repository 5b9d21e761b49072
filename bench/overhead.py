"""Benchmark 1, gateway overhead: the same fixed-rate engine (a) read in-process and (b) through
frontend -> Redis -> worker (separate processes on loopback), at each stream count, in one run.

Reports the ratio of tokens/s (stack / direct) and the time to first token the stack adds (p50, p99),
plus the CPU each process used. The engine is `bench/stepped_engine.py`: every running request gets a
token per step, `--rate` steps a second; its first token comes at once, so direct TTFT is ~0 and the
added TTFT is the gateway's alone.

    .venv/bin/python bench/overhead.py [--streams 1 64 256] [--rate 50] [--tokens 200] [--duration 8]
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
from bench.loadgen import LoadResult, LoadSpec, engine_streamer, grpc_streamer, open_channels, run_load
from bench.plots import plot_bars
from bench.profiling import print_profiles, profile_pids
from bench.stepped_engine import SteppedEngine


async def run_direct(spec: LoadSpec, rate: float, tokens: int) -> LoadResult:
    engine = SteppedEngine(tokens_per_s=rate, default_tokens=tokens)
    await engine.start()
    try:
        return await run_load(engine_streamer(engine), spec, progress=sys.stderr.isatty(), label="direct")
    finally:
        await engine.shutdown()


async def run_stack(spec: LoadSpec, targets: list[str]) -> LoadResult:
    channels = open_channels(targets)
    try:
        streamer = grpc_streamer(channels)
        warm = LoadSpec(concurrency=min(spec.concurrency or 1, 32), requests=64, max_tokens=4, deadline_s=30)
        await run_load(streamer, warm)
        return await run_load(streamer, spec, progress=sys.stderr.isatty(), label="stack")
    finally:
        for channel in channels:
            await channel.close()


def row(
    streams: int, direct: dict[str, Any], through: dict[str, Any], cpu: dict[str, float]
) -> dict[str, Any]:
    wall = cpu["wall_s"]
    return {
        "streams": streams,
        "direct_tokens_per_s": direct["tokens_per_s"],
        "stack_tokens_per_s": through["tokens_per_s"],
        "ratio": through["tokens_per_s"] / direct["tokens_per_s"],
        "direct_ttft_p50_ms": direct["ttft_ms"]["p50"],
        "direct_ttft_p99_ms": direct["ttft_ms"]["p99"],
        "stack_ttft_p50_ms": through["ttft_ms"]["p50"],
        "stack_ttft_p99_ms": through["ttft_ms"]["p99"],
        "added_ttft_p50_ms": through["ttft_ms"]["p50"] - direct["ttft_ms"]["p50"],
        "added_ttft_p99_ms": through["ttft_ms"]["p99"] - direct["ttft_ms"]["p99"],
        "direct_errors": direct["errors"],
        "stack_errors": through["errors"],
        # Share of one core each process used during the stack's run.
        "cpu_cores": {name: used / wall for name, used in cpu.items() if name != "wall_s"},
        # CPU per token: a process's cores over the tokens/s delivered in the window.
        "cpu_ms_per_1k_tokens": {
            name: 1e6 * used / wall / max(through["tokens_per_s"], 1e-9)
            for name, used in cpu.items()
            if name != "wall_s"
        },
    }


TABLE_HEADERS = [
    "streams",
    "direct tok/s",
    "stack tok/s",
    "ratio",
    "TTFT direct p50/p99 ms",
    "TTFT stack p50/p99 ms",
    "added p50 ms",
    "added p99 ms",
    "CPU cores: frontend / worker / redis / client",
    "CPU ms / 1k tokens: frontend / worker / redis",
    "errors",
]


def table_rows(rows: list[dict[str, Any]]) -> list[list[object]]:
    out: list[list[object]] = []
    for r in rows:
        c = r["cpu_cores"]
        out.append(
            [
                r["streams"],
                r["direct_tokens_per_s"],
                r["stack_tokens_per_s"],
                f"{r['ratio']:.3f}",
                f"{r['direct_ttft_p50_ms']:.2f} / {r['direct_ttft_p99_ms']:.2f}",
                f"{r['stack_ttft_p50_ms']:.2f} / {r['stack_ttft_p99_ms']:.2f}",
                f"{r['added_ttft_p50_ms']:.2f}",
                f"{r['added_ttft_p99_ms']:.2f}",
                f"{c['frontend']:.2f} / {c['worker']:.2f} / {c['redis']:.2f} / {c['client']:.2f}",
                " / ".join(
                    f"{r['cpu_ms_per_1k_tokens'][name]:.1f}" for name in ("frontend", "worker", "redis")
                ),
                sum(r["stack_errors"].values()) + sum(r["direct_errors"].values()),
            ]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--rate", type=float, default=50.0, help="engine steps (tokens per stream) a second")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per request")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per measurement")
    parser.add_argument("--profile", action="store_true", help="py-spy the stack at the largest stream count")
    parser.add_argument("--name", default="overhead", help="result files: bench/results/NAME.{json,md,png}")
    args = parser.parse_args()

    settings = {
        "MISTRAL_SERVE_ENGINE": STEPPED_ENGINE,
        "STEPPED_TOKENS_PER_S": str(args.rate),
        "STEPPED_TOKENS": str(args.tokens),
        "MISTRAL_SERVE_WORKER_MAX_INFLIGHT": str(max(args.streams) * 2),
        "MISTRAL_SERVE_MAX_BACKLOG": str(max(args.streams) * 4),
    }
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    with stack(args.name, settings=settings) as running:
        meter_pids = {
            "frontend": running.frontend_pids,
            "worker": running.worker_pids,
            "redis": [running.redis_pid],
            "client": [os.getpid()],
        }
        for streams in args.streams:
            # Streams start spread over one request's length, so they do not step in lockstep; the
            # window measured starts after that ramp, and streams still open at its end are cut.
            ramp = args.tokens / args.rate if streams > 1 else 0.0
            spec = LoadSpec(
                concurrency=streams,
                duration_s=args.duration,
                max_tokens=args.tokens,
                deadline_s=60,
                ramp_s=ramp,
                drain=False,
            )
            direct = uvloop.run(run_direct(spec, args.rate, args.tokens)).summary()
            meter = CpuMeter(meter_pids)
            meter.start()
            profiling = None
            if args.profile and streams == max(args.streams):
                profiling = profile_pids(
                    {"frontend": running.frontend_pids[0], "worker": running.worker_pids[0]},
                    duration_s=args.duration * 0.75,
                    name=f"{args.name}-{streams}",
                )
            through = uvloop.run(run_stack(spec, running.targets)).summary()
            cpu = meter.stop()
            if profiling is not None:
                profiles = profiling.collect()
            rows.append(row(streams, direct, through, cpu))
            running.procs.check_alive()
            print(f"{streams} streams: ratio {rows[-1]['ratio']:.3f}", file=sys.stderr)

    table = markdown_table(TABLE_HEADERS, table_rows(rows))
    notes = (
        f"Engine: {args.tokens} tokens per request, one token per stream every {1000 / args.rate:.0f} ms "
        f"({args.rate:.0f} tokens/s per stream). Closed loop: streams start spread over one request's "
        f"length ({args.tokens / args.rate:.0f} s), then {args.duration:.0f} s are measured; tokens/s counts "
        "tokens received in that window, TTFT covers requests started in it."
    )
    print(f"\n{notes}\n\n{table}\n")
    write_json(
        args.name,
        {
            "machine": machine(),
            "command": command_line(),
            "args": vars(args),
            "rows": rows,
            "profiles": profiles,
        },
    )
    write_table(args.name, "Gateway overhead", command_line(), table, notes)
    groups = [str(r["streams"]) for r in rows]
    plot_bars(
        RESULTS / f"{args.name}.png",
        f"direct vs through the stack, {args.rate:.0f} tokens/s per stream",
        groups,
        [
            (
                "tokens/s",
                {
                    "direct": [r["direct_tokens_per_s"] for r in rows],
                    "stack": [r["stack_tokens_per_s"] for r in rows],
                },
            ),
            (
                "TTFT p50 ms",
                {
                    "direct": [r["direct_ttft_p50_ms"] for r in rows],
                    "stack": [r["stack_ttft_p50_ms"] for r in rows],
                },
            ),
            (
                "TTFT p99 ms",
                {
                    "direct": [r["direct_ttft_p99_ms"] for r in rows],
                    "stack": [r["stack_ttft_p99_ms"] for r in rows],
                },
            ),
        ],
    )
    print_profiles(profiles)


if __name__ == "__main__":
    main()
