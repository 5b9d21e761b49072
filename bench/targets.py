"""The targets of issue 18 from the results of `bench/run_all.py --repeat N`: every row's ratio in each
run and the median of the runs (runs on this machine move about 10% from one to the next).

Reads bench/results/{vs_vllm,overhead,scaling}-runK.json and prints one markdown table.

    .venv/bin/python bench/targets.py [--runs 3] [--baseline-tokens-per-s 20000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS

Run = dict[str, Any]
VLLM, DIRECT = "vllm serve (SSE)", "AsyncLLM in-process"
DOORS = {"gRPC": "mistral-serve (gRPC)", "HTTP": "mistral-serve (HTTP/SSE)"}


def load(name: str, runs: int) -> list[Run]:
    return [json.loads((RESULTS / f"{name}-run{k}.json").read_text()) for k in range(1, runs + 1)]


def vs_row(run: Run, side: str, concurrency: int) -> dict[str, Any]:
    for row in run["rows"]:
        if row["side"] == side and row["concurrency"] == concurrency:
            return dict(row)
    raise KeyError(f"no row for {side} at {concurrency}")


def front_end_ms_per_1k(row: dict[str, Any]) -> float:
    return float(1e6 * row["cpu_s"]["front_end"] / max(row["summary"]["tokens"], 1))


def overhead_row(run: Run, streams: int) -> dict[str, Any]:
    return dict(next(r for r in run["rows"] if r["streams"] == streams))


def line(name: str, values: list[float], goal: Callable[[float], bool], fmt: str = "{:.2f}") -> str:
    median = statistics.median(values)
    runs = " / ".join(fmt.format(v) for v in values)
    return f"| {name} | {runs} | {fmt.format(median)} | {'met' if goal(median) else '**missed**'} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline-tokens-per-s", type=float, default=20000.0, help="the issue's ~20k")
    args = parser.parse_args()
    vs, over, scale = (load(n, args.runs) for n in ("vs_vllm", "overhead", "scaling"))
    lines = ["| target | each run | median | met? |", "|---|---|---:|---|"]
    for door, side in DOORS.items():
        for c in (1, 16, 64):
            ratios = [
                vs_row(r, side, c)["summary"]["tokens_per_s"] / vs_row(r, VLLM, c)["summary"]["tokens_per_s"]
                for r in vs
            ]
            lines.append(line(f"{door} tokens/s / vllm serve's at {c} (≥ 1.0)", ratios, lambda m: m >= 1.0))
        for c in (1, 16, 64):
            for p in ("p50", "p99"):
                ratios = [
                    vs_row(r, side, c)["summary"]["ttft_ms"][p] / vs_row(r, VLLM, c)["summary"]["ttft_ms"][p]
                    for r in vs
                ]
                lines.append(
                    line(f"{door} TTFT {p} / vllm serve's at {c} (≤ 1.0)", ratios, lambda m: m <= 1.0)
                )
        for c in (16, 64):
            ratios = [
                front_end_ms_per_1k(vs_row(r, side, c)) / front_end_ms_per_1k(vs_row(r, VLLM, c)) for r in vs
            ]
            lines.append(
                line(
                    f"{door} front-end CPU per token / vLLM API server's at {c} (≤ 1.0)",
                    ratios,
                    lambda m: m <= 1.0,
                )
            )
    direct = [
        vs_row(r, DOORS["gRPC"], 16)["summary"]["ttft_ms"]["p50"]
        / vs_row(r, DIRECT, 16)["summary"]["ttft_ms"]["p50"]
        for r in vs
    ]
    lines.append(line("gRPC TTFT p50 / direct AsyncLLM's at 16 (≤ 1.3)", direct, lambda m: m <= 1.3))
    added = [overhead_row(r, 64) for r in over]
    lines.append(
        line(
            "gateway added TTFT p50 at 64, ms (≤ 2)",
            [a["added_ttft_p50_ms"] for a in added],
            lambda m: m <= 2,
        )
    )
    lines.append(
        line(
            "gateway added TTFT p99 at 64, ms (≤ 10)",
            [a["added_ttft_p99_ms"] for a in added],
            lambda m: m <= 10,
        )
    )
    wide = [overhead_row(r, 256) for r in over]
    lines.append(
        line(
            "gateway tokens/s ratio at 256 (≥ 0.98)",
            [w["ratio"] for w in wide],
            lambda m: m >= 0.98,
            "{:.3f}",
        )
    )
    lines.append(
        line(
            "gateway added TTFT p99 at 256, ms (≤ 50)",
            [w["added_ttft_p99_ms"] for w in wide],
            lambda m: m <= 50,
            "{:.1f}",
        )
    )
    one = [
        next(row for row in r["rows"] if row["frontends"] == 1 and row["workers"] == 2)["summary"][
            "tokens_per_s"
        ]
        for r in scale
    ]
    goal = 2 * args.baseline_tokens_per_s
    lines.append(line(f"one frontend, tokens/s (≥ {goal:.0f})", one, lambda m: m >= goal, "{:.0f}"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
