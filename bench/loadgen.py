"""Load generator for mistral-serve over gRPC (grpc.aio), loopback only, bounded in time and count.

Closed loop (`--concurrency N`: N streams back to back) or open loop (`--rate R`: Poisson arrivals,
at most `--max-inflight` at once, the excess counted as CLIENT_OVERLOAD); `--duration S` or
`--requests N`; a prompt mix of text, image, tools and long context; a deadline on every call. A live
progress bar on stderr; results as JSON (summary, per-second timeline, every request) and a PNG
(latency percentiles over time, tokens/s, errors by code).

    .venv/bin/python bench/loadgen.py --target 127.0.0.1:50051 --concurrency 64 --duration 20 \\
        --mix text=0.7,image=0.1,tools=0.1,long=0.1 --max-tokens 128 --deadline-s 30 --out bench/results/load
    .venv/bin/python bench/loadgen.py --start-stack --rate 200 --requests 2000   # a stack of its own
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import code_pb2

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import prompts
from bench.common import percentile, require_loopback
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from mistral_serve.worker.engine import Engine, EngineRequest

OK = "OK"
CUT = "CUT"
CLIENT_OVERLOAD = "CLIENT_OVERLOAD"
# Bounds no flag can lift: the tool must not become a stress weapon by accident.
MAX_DURATION_S = 900.0
MAX_REQUESTS = 200_000
MAX_CONCURRENCY = 2048
MAX_RATE = 10_000.0


class CallFailed(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


# Streams one request: yields the number of tokens in each piece as it arrives; raises CallFailed.
Streamer = Callable[[chat_pb2.ChatRequest, float], AsyncIterator[int]]


@dataclass(slots=True)
class Outcome:
    kind: str
    start: float  # seconds since the run began
    end: float
    code: str
    tokens: int = 0
    first_at: float | None = None  # when the first token arrived (seconds since the run began)
    last_at: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.start

    @property
    def itl(self) -> float | None:
        """Mean time between tokens after the first (time per output token)."""
        if self.first_at is None or self.last_at is None or self.tokens < 2:
            return None
        return (self.last_at - self.first_at) / (self.tokens - 1)


@dataclass
class LoadSpec:
    concurrency: int | None = None
    rate: float | None = None
    duration_s: float | None = None
    requests: int | None = None
    mix: dict[str, float] = field(default_factory=lambda: {"text": 1.0})
    max_tokens: int = 128
    deadline_s: float = 60.0
    max_inflight: int = 1024
    long_words: int = 3000
    seed: int = 0
    # Closed loop: streams start spread over this many seconds; measured from then on for duration_s.
    ramp_s: float = 0.0
    # At the end, wait for running calls (True) or cut them (False, counted as CUT, not as errors).
    drain: bool = True

    def check(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise SystemExit("give one of --concurrency or --rate")
        if self.duration_s is None and self.requests is None:
            raise SystemExit("give --duration or --requests (or both)")
        if not 0 < (self.concurrency or 1) <= MAX_CONCURRENCY:
            raise SystemExit(f"--concurrency must be 1..{MAX_CONCURRENCY}")
        if not 0 < (self.rate or 1) <= MAX_RATE:
            raise SystemExit(f"--rate must be in (0, {MAX_RATE:.0f}]")
        if not 0 < (self.duration_s or 1) <= MAX_DURATION_S:
            raise SystemExit(f"--duration must be in (0, {MAX_DURATION_S:.0f}]")
        if not 0 < (self.requests or 1) <= MAX_REQUESTS:
            raise SystemExit(f"--requests must be 1..{MAX_REQUESTS}")


@dataclass
class LoadResult:
    spec: LoadSpec
    outcomes: list[Outcome]
    wall_s: float
    token_bins: dict[int, int]  # tokens that arrived in each second of the run
    window_tokens: int  # tokens that arrived in the measured window [ramp_s, ramp_s + duration_s)
    bin_s: float = 1.0

    def summary(self) -> dict[str, Any]:
        spec = self.spec
        measured = [o for o in self.outcomes if o.start >= spec.ramp_s]
        window_s = spec.duration_s if spec.duration_s and not spec.drain else self.wall_s - spec.ramp_s
        return summarize(measured, window_s, self.window_tokens)

    def timeline(self) -> list[dict[str, Any]]:
        """Per second: latency percentiles of requests that ended in it, tokens that arrived, errors."""
        by_bin: dict[int, list[Outcome]] = {}
        for o in self.outcomes:
            by_bin.setdefault(int(o.end // self.bin_s), []).append(o)
        last = max([*by_bin, *self.token_bins, 0])
        rows = []
        for b in range(last + 1):
            ended = by_bin.get(b, [])
            ttfts = [t for o in ended if (t := o.ttft) is not None]
            e2e = [o.end - o.start for o in ended if o.code == OK]
            ended = [o for o in ended if o.code != CUT]
            rows.append(
                {
                    "t": b * self.bin_s,
                    "tokens_per_s": self.token_bins.get(b, 0) / self.bin_s,
                    "ttft_p50_ms": percentile(ttfts, 0.5) * 1000,
                    "ttft_p99_ms": percentile(ttfts, 0.99) * 1000,
                    "e2e_p50_ms": percentile(e2e, 0.5) * 1000,
                    "e2e_p99_ms": percentile(e2e, 0.99) * 1000,
                    "errors": dict(Counter(o.code for o in ended if o.code != OK)),
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "summary": self.summary(),
            "timeline": self.timeline(),
            "requests": [{**asdict(o), "ttft": o.ttft, "itl": o.itl} for o in self.outcomes],
        }


def summarize(outcomes: list[Outcome], window_s: float, tokens: int) -> dict[str, Any]:
    """Latencies of `outcomes`; throughput from the `tokens` that arrived in `window_s` seconds."""
    ok = [o for o in outcomes if o.code == OK]
    ttfts = [t for o in outcomes if (t := o.ttft) is not None]
    itls = [t for o in ok if (t := o.itl) is not None]
    e2e = [o.end - o.start for o in ok]
    ended = [o for o in outcomes if o.code != CUT]
    return {
        "requests": len(ended),
        "ok": len(ok),
        "cut_at_end": len(outcomes) - len(ended),
        "errors": dict(Counter(o.code for o in ended if o.code != OK)),
        "window_s": window_s,
        "tokens": tokens,
        "tokens_per_s": tokens / window_s if window_s else 0.0,
        "requests_per_s": len(ended) / window_s if window_s else 0.0,
        "ttft_ms": {q: percentile(ttfts, p) * 1000 for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "itl_ms": {q: percentile(itls, p) * 1000 for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "e2e_ms": {q: percentile(e2e, p) * 1000 for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "by_kind": {kind: sum(1 for o in outcomes if o.kind == kind) for kind in {o.kind for o in outcomes}},
    }


def grpc_streamer(channels: list[grpc.aio.Channel], *, api_key: str | None = None) -> Streamer:
    """Streams over ChatStream, the channels taken in turn; every call carries its deadline (and
    `api_key` as its bearer token, when given)."""
    metadata = None if api_key is None else (("authorization", f"Bearer {api_key}"),)
    stubs = [chat_pb2_grpc.ChatServiceStub(channel) for channel in channels]
    turn = 0

    async def stream(request: chat_pb2.ChatRequest, deadline_s: float) -> AsyncIterator[int]:
        nonlocal turn
        stub = stubs[turn % len(stubs)]
        turn += 1
        call = stub.ChatStream(
            chat_pb2.ChatStreamRequest(request=request), timeout=deadline_s, metadata=metadata
        )
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    if event.delta.token_count:
                        yield event.delta.token_count
                elif kind == "error":
                    raise CallFailed(code_pb2.Code.Name(event.error.code))
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name) from None
        finally:
            call.cancel()

    return stream


def engine_streamer(engine: Engine) -> Streamer:
    """Streams straight from an engine in this process (the direct side of a comparison): no server,
    no queue; each request gets its own id."""
    counter = 0

    async def stream(request: chat_pb2.ChatRequest, deadline_s: float) -> AsyncIterator[int]:
        nonlocal counter
        counter += 1
        async for out in engine.generate(EngineRequest(f"direct-{counter}", request)):
            if out.token_ids:
                yield len(out.token_ids)

    return stream


def open_channels(targets: list[str], per_target: int = 1) -> list[grpc.aio.Channel]:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
    return [
        grpc.aio.insecure_channel(require_loopback(t), options=options)
        for t in targets
        for _ in range(per_target)
    ]


class _Run:
    """One run's shared state: the clock, what ended, tokens per second bin, a stop flag."""

    def __init__(self, spec: LoadSpec, streamer: Streamer) -> None:
        self.spec = spec
        self.streamer = streamer
        self.kind_of = prompts.chooser(spec.mix, spec.seed)
        self.t0 = time.perf_counter()
        self.outcomes: list[Outcome] = []
        self.bins: Counter[int] = Counter()
        self.window_tokens = 0
        self.window_end = spec.ramp_s + (spec.duration_s or MAX_DURATION_S)
        self.issued = 0
        self.inflight = 0
        self.stop = False
        self._requests: dict[int, tuple[str, chat_pb2.ChatRequest]] = {}

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def next_index(self) -> int | None:
        spec = self.spec
        if self.stop or (spec.requests is not None and self.issued >= spec.requests):
            return None
        if spec.duration_s is not None and self.now() >= self.window_end:
            return None
        self.issued += 1
        return self.issued - 1

    def request(self, index: int) -> tuple[str, chat_pb2.ChatRequest]:
        # Requests repeat every 64 indices: building long prompts must not load the client.
        key = index % 64
        if key not in self._requests:
            kind = self.kind_of(key)
            self._requests[key] = (
                kind,
                prompts.make_request(
                    kind, key, max_tokens=self.spec.max_tokens, long_words=self.spec.long_words
                ),
            )
        return self._requests[key]

    async def one(self, index: int) -> None:
        kind, request = self.request(index)
        outcome = Outcome(kind, self.now(), 0.0, OK)
        self.inflight += 1
        try:
            async for n in self.streamer(request, self.spec.deadline_s):
                at = self.now()
                if outcome.first_at is None:
                    outcome.first_at = at
                outcome.last_at = at
                outcome.tokens += n
                self.bins[int(at)] += n
                if self.spec.ramp_s <= at < self.window_end:
                    self.window_tokens += n
        except CallFailed as exc:
            outcome.code = exc.code
        except asyncio.CancelledError:
            outcome.code = CUT
            raise
        except Exception as exc:  # a client-side bug must show as an error, not end the run
            outcome.code = f"CLIENT_{type(exc).__name__}"
        finally:
            self.inflight -= 1
            outcome.end = self.now()
            self.outcomes.append(outcome)

    async def closed_loop(self, concurrency: int) -> None:
        async def user(i: int) -> None:
            await asyncio.sleep(self.spec.ramp_s * i / concurrency)
            while (index := self.next_index()) is not None:
                await self.one(index)

        users = [asyncio.ensure_future(user(i)) for i in range(concurrency)]
        try:
            if self.spec.drain or self.spec.duration_s is None:
                await asyncio.gather(*users)
            else:
                await asyncio.wait(users, timeout=max(self.window_end - self.now(), 0.0))
        finally:
            for task in users:
                task.cancel()
            await asyncio.gather(*users, return_exceptions=True)

    async def open_loop(self, rate: float) -> None:
        rng = random.Random(self.spec.seed)
        tasks: set[asyncio.Task[None]] = set()
        next_at = 0.0
        while (index := self.next_index()) is not None:
            next_at += rng.expovariate(rate)
            await asyncio.sleep(max(next_at - self.now(), 0.0))
            if self.inflight >= self.spec.max_inflight:
                self.outcomes.append(Outcome(self.request(index)[0], self.now(), self.now(), CLIENT_OVERLOAD))
                continue
            task = asyncio.get_running_loop().create_task(self.one(index))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)


async def run_load(
    streamer: Streamer, spec: LoadSpec, *, progress: bool = False, label: str = ""
) -> LoadResult:
    """Drive `streamer` as `spec` says; stops issuing at the duration or count, and cancels whatever
    still runs a deadline (plus 5 s) after that."""
    spec.check()
    run = _Run(spec, streamer)
    body = run.closed_loop(spec.concurrency) if spec.concurrency else run.open_loop(spec.rate or 1.0)
    limit = (spec.duration_s or MAX_DURATION_S) + spec.deadline_s + 5.0
    reporter = asyncio.get_running_loop().create_task(_progress(run, label)) if progress else None
    try:
        await asyncio.wait_for(body, timeout=limit)
    except TimeoutError:
        run.stop = True
    finally:
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    return LoadResult(spec, run.outcomes, run.now(), dict(run.bins), run.window_tokens)


async def _progress(run: _Run, label: str) -> None:
    from tqdm import tqdm

    spec = run.spec
    by_count = spec.requests is not None and spec.duration_s is None
    total = float(spec.requests) if by_count and spec.requests else float(spec.duration_s or 0)
    bar = tqdm(
        total=total, desc=label or "load", unit="req" if by_count else "s", file=sys.stderr, leave=False
    )
    try:
        while True:
            await asyncio.sleep(0.25)
            done = float(len(run.outcomes)) if by_count else min(run.now(), total)
            bar.n = done
            errors = sum(1 for o in run.outcomes if o.code != OK)
            now = int(run.now())
            bar.set_postfix(
                inflight=run.inflight,
                done=len(run.outcomes),
                err=errors,
                tok_s=run.bins.get(now - 1, 0),
                refresh=False,
            )
            bar.refresh()
    finally:
        bar.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target", action="append", default=[], help="host:port on loopback; repeat for several"
    )
    parser.add_argument(
        "--start-stack", action="store_true", help="start Redis + frontend + worker (fast engine)"
    )
    parser.add_argument("--engine-rate", type=float, default=50.0, help="--start-stack: tokens/s per stream")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int, help="closed loop: streams kept open at once")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    parser.add_argument("--duration", type=float, help="seconds to issue requests for")
    parser.add_argument("--requests", type=int, help="requests to issue")
    parser.add_argument("--mix", default="text=1", help="kind=weight,... of text, image, tools, long")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--long-words", type=int, default=3000, help="words in a long-context prompt")
    parser.add_argument("--deadline-s", type=float, default=60.0, help="deadline of each call")
    parser.add_argument("--max-inflight", type=int, default=1024, help="open loop: most calls at once")
    parser.add_argument("--channels", type=int, default=1, help="gRPC channels per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/load", help="writes OUT.json and OUT.png")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


async def _main_async(args: argparse.Namespace, targets: list[str]) -> LoadResult:
    spec = LoadSpec(
        concurrency=args.concurrency,
        rate=args.rate,
        duration_s=args.duration,
        requests=args.requests,
        mix=prompts.parse_mix(args.mix),
        max_tokens=args.max_tokens,
        deadline_s=args.deadline_s,
        max_inflight=min(args.max_inflight, MAX_CONCURRENCY),
        long_words=args.long_words,
        seed=args.seed,
    )
    channels = open_channels(targets, args.channels)
    try:
        return await run_load(grpc_streamer(channels), spec, progress=not args.no_progress)
    finally:
        for channel in channels:
            await channel.close()


def main(argv: list[str] | None = None) -> None:
    import json

    from bench.common import STEPPED_ENGINE, stack
    from bench.plots import plot_load

    args = parse_args(argv)
    if not args.target and not args.start_stack:
        raise SystemExit("give --target host:port (loopback) or --start-stack")
    for target in args.target:
        require_loopback(target)
    settings = {
        "MISTRAL_SERVE_ENGINE": STEPPED_ENGINE,
        "STEPPED_TOKENS_PER_S": str(args.engine_rate),
        "MISTRAL_SERVE_WORKER_MAX_INFLIGHT": "1024",
        "MISTRAL_SERVE_MAX_BACKLOG": "2048",
    }
    ctx = stack("loadgen", settings=settings) if args.start_stack else contextlib.nullcontext(None)
    with ctx as running:
        targets = args.target or (running.targets if running else [])
        result = asyncio.run(_main_async(args, targets))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    Path(f"{out}.json").write_text(json.dumps(data, indent=2, default=float))
    plot_load(data, Path(f"{out}.png"), title=f"{' '.join(targets)}: {args.mix}")
    s = data["summary"]
    print(
        f"{s['requests']} requests ({s['ok']} ok) in {s['wall_s']:.1f}s: {s['tokens_per_s']:.0f} tokens/s, "
        f"TTFT p50 {s['ttft_ms']['p50']:.1f} ms p99 {s['ttft_ms']['p99']:.1f} ms, "
        f"ITL p50 {s['itl_ms']['p50']:.2f} ms, errors {s['errors'] or 'none'}"
    )
    print(f"wrote {out}.json and {out}.png")


if __name__ == "__main__":
    main()
