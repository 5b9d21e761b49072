"""`make bench`: benchmarks 1-3 and 5 (overhead, against vllm serve, scaling, fairness), each printing
its table and writing JSON (+ PNG) under bench/results/; then the tables go into bench/README.md between
its markers.

The stack runs from a snapshot of a commit (default HEAD, with its protobuf code generated), so that
edits others make to the working tree meanwhile neither break nor bend a run; `--working-tree` runs
the checkout as it is. Each benchmark has a time limit; the whole run stays under 15 minutes.

    .venv/bin/python bench/run_all.py [--repeat 2] [--only overhead vs_vllm scaling fairness] [--rev HEAD]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, RESULTS, code_path, snapshot

README = REPO / "bench" / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
# name -> (script, seconds it may take)
BENCHMARKS = {
    "overhead": ("bench/overhead.py", 150),
    "vs_vllm": ("bench/vs_vllm.py", 480),  # four sides: the in-process AsyncLLM, vllm serve, gRPC, HTTP
    "scaling": ("bench/scaling.py", 150),
    "fairness": ("bench/fairness.py", 120),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each benchmark (tables: each run)")
    parser.add_argument("--rev", default="HEAD", help="commit whose stack is measured")
    parser.add_argument("--working-tree", action="store_true", help="measure the checkout as it is")
    parser.add_argument("--no-readme", action="store_true", help="leave bench/README.md alone")
    args = parser.parse_args()

    env = dict(os.environ)
    paths = [str(REPO)]
    label = "working tree"
    if not args.working_tree:
        root, sha = snapshot(args.rev)
        env["BENCH_CODE"] = str(root)
        paths = [*code_path(root), str(REPO)]
        label = f"commit {sha}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    print(f"measuring the stack at {label}", flush=True)

    started = time.monotonic()
    names: list[str] = []
    failed: list[str] = []
    for run in range(1, args.repeat + 1):
        for bench in args.only:
            script, limit = BENCHMARKS[bench]
            name = bench if args.repeat == 1 else f"{bench}-run{run}"
            print(f"\n== {name} ({script}, at most {limit} s)", flush=True)
            try:
                subprocess.run(
                    [sys.executable, script, "--name", name], cwd=REPO, env=env, timeout=limit, check=True
                )
                names.append(name)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                print(f"{name} failed: {exc}", file=sys.stderr)
                failed.append(name)
    print(f"\nall benchmarks: {time.monotonic() - started:.0f} s", flush=True)
    if not args.no_readme and names:
        update_readme(names, label)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def update_readme(names: list[str], label: str) -> None:
    """Replace what is between the README's markers with the tables of this run."""
    parts = [f"Stack measured at {label}.\n"]
    for name in names:
        table = RESULTS / f"{name}.md"
        if table.exists():
            text = table.read_text()
            png = RESULTS / f"{name}.png"
            if png.exists():
                text += f"\n![{name}](results/{png.name})\n"
            parts.append(text)
    block = f"{START}\n" + "\n".join(parts) + f"\n{END}"
    readme = README.read_text() if README.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in readme:
        readme += f"\n{START}\n{END}\n"
    README.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S))
    print(f"updated {README.relative_to(REPO)}")


if __name__ == "__main__":
    main()
