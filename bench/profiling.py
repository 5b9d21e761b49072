"""py-spy profiles of running stack processes, summarised as the functions that take the time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import RESULTS

# Frames of our code (or the libraries it calls) that name a hot spot better than the leaf does.
OUR_CODE = ("frontend/", "worker/", "common/", "bench/")


@dataclass
class Profiling:
    running: dict[str, tuple[subprocess.Popen[bytes], Path]]

    def collect(self) -> dict[str, list[dict[str, Any]]]:
        """Wait for each profile; per process, the top leaf functions and our own frames by share."""
        out: dict[str, list[dict[str, Any]]] = {}
        for name, (process, path) in self.running.items():
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if path.exists():
                out[name] = summarize_collapsed(path.read_text())
                out[f"{name} (own code, inclusive)"] = summarize_collapsed(path.read_text(), ours=True)
        return out


def profile_pids(pids: dict[str, int], *, duration_s: float, name: str) -> Profiling | None:
    """Start `py-spy record` (collapsed stacks, idle excluded) on each pid for `duration_s`."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy is not installed: no profile", file=sys.stderr)
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    running = {}
    for proc, pid in pids.items():
        path = RESULTS / f"profile-{name}-{proc}.txt"
        argv = [py_spy, "record", "--pid", str(pid), "--duration", str(max(int(duration_s), 1))]
        argv += ["--rate", "200", "--format", "raw", "--output", str(path)]
        # Native frames (C under the event loop: grpc, uvloop, hiredis) pause the process per sample.
        argv += ["--native"] if os.environ.get("BENCH_PROFILE_NATIVE") == "1" else ["--nonblocking"]
        running[proc] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path)
    return Profiling(running)


def summarize_collapsed(text: str, *, ours: bool = False, top: int = 15) -> list[dict[str, Any]]:
    """From `stack;frames;leaf count` lines: the leaf functions (own time) or, with `ours`, the frames
    of our code anywhere on the stack (inclusive time), by share of samples."""
    counts: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        samples = int(n)
        total += samples
        # "function (path:line)" -> "function (path)": a function's lines add up.
        frames = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") and ":" in f else f for f in stack.split(";")]
        if ours:
            for frame in dict.fromkeys(f for f in frames if any(tag in f for tag in OUR_CODE)):
                counts[frame] += samples
        else:
            counts[frames[-1]] += samples
    return [{"function": f, "share": c / total} for f, c in counts.most_common(top)] if total else []


def print_profiles(profiles: dict[str, list[dict[str, Any]]], where: str = "", top: int = 12) -> None:
    """Each process's summary (as `Profiling.collect` gives them) on stdout."""
    for proc, entries in profiles.items():
        print(f"py-spy, {proc}{where}: top functions by share of samples")
        for entry in entries[:top]:
            print(f"  {entry['share']:6.1%}  {entry['function']}")
