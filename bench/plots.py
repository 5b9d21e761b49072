"""PNG plots of load results (matplotlib, no display). Small on purpose: they are committed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DPI = 80


def plot_load(data: dict[str, Any], path: Path, *, title: str = "") -> Path:
    """Three panels: TTFT/e2e percentiles over time, tokens/s over time, errors by code."""
    timeline = data["timeline"]
    t = [row["t"] for row in timeline]
    fig, (lat, tok, err) = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, style in (
        ("ttft_p50_ms", "-"),
        ("ttft_p99_ms", "--"),
        ("e2e_p50_ms", "-"),
        ("e2e_p99_ms", "--"),
    ):
        lat.plot(t, [row[key] for row in timeline], style, label=key.replace("_ms", ""))
    lat.set(xlabel="time (s)", ylabel="ms", title="latency of requests ending each second", yscale="log")
    lat.legend(fontsize=7)
    tok.plot(t, [row["tokens_per_s"] for row in timeline])
    tok.set(xlabel="time (s)", ylabel="tokens/s", title="tokens received per second")
    errors: dict[str, int] = data["summary"]["errors"]
    codes = sorted(errors) or ["none"]
    err.bar(codes, [errors.get(c, 0) for c in codes], color="tab:red")
    err.set(title=f"errors by code ({data['summary']['requests']} requests)")
    err.tick_params(axis="x", labelrotation=20, labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_bars(
    path: Path,
    title: str,
    groups: Sequence[str],
    panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]],
) -> Path:
    """One panel per metric: bars of each series (e.g. direct vs stack) for each group (e.g. streams)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.4))
    axes_list = list(axes) if len(panels) > 1 else [axes]
    for ax, (metric, series) in zip(axes_list, panels, strict=True):
        width = 0.8 / max(len(series), 1)
        for i, (name, values) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, values, width, label=name)
        ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
