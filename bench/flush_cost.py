"""CPU of one event flush: the worker's `EventWriter` writing one record for each of `--streams` requests
(the mid-stream case: no TTL to set), its own CPU and Redis's, per record.

The writer is whatever `mistral_serve.worker.events` the path gives: run it once on this checkout and
once with `BENCH_CODE=<another checkout>` to compare two ways of writing a flush, on a quiet Redis of
its own, without the noise of a whole stack sharing the CPUs.

    .venv/bin/python bench/flush_cost.py [--streams 256] [--flushes 400]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import uvloop

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as redis

from bench.common import base_env, code_root
from devtools.local_stack import start_redis
from mistral_serve.v1 import chat_pb2
from mistral_serve.worker import events

# This process imported this checkout's code already: the writer of BENCH_CODE needs a fresh one.
_AGAIN = "BENCH_FLUSH_COST_CODE"


async def run(url: str, redis_pid: int, streams: int, flushes: int) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    # The interval is long: each flush is written only when this loop asks for it (`_write`).
    writer = events.EventWriter(client, pool="bench", ttl_s=600, interval_s=60, max_events=1 << 20)
    ids = [f"req{i:04d}" for i in range(streams)]

    def batch(sequence: int) -> dict[str, events._Pending]:
        for request_id in ids:
            event = chat_pb2.ChatEvent(delta=chat_pb2.Delta(sequence=sequence, text=" word", token_count=1))
            writer.emit(request_id, event, token_ids=[sequence], raw_text=" word")
        pending, writer._pending = writer._pending, {}
        return pending

    await writer._write(batch(1))  # first records: TTLs set, script loaded
    server = psutil.Process(redis_pid)
    redis_before = sum(server.cpu_times()[:2])
    before = time.process_time()
    for sequence in range(2, flushes + 2):
        await writer._write(batch(sequence))
    own = time.process_time() - before
    redis_cpu = sum(server.cpu_times()[:2]) - redis_before
    await client.aclose()
    records = streams * flushes
    return {"writer_us_per_record": 1e6 * own / records, "redis_us_per_record": 1e6 * redis_cpu / records}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--flushes", type=int, default=400)
    args = parser.parse_args()
    root = code_root()
    if root is not None and os.environ.get(_AGAIN) != str(root):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**base_env(), _AGAIN: str(root)})
    with tempfile.TemporaryDirectory(prefix="bench-flush-") as data:
        server = start_redis(Path(data))
        try:
            result = uvloop.run(run(server.url, server.process.pid, args.streams, args.flushes))
        finally:
            server.stop()
    writer_from = Path(events.__file__).resolve().parents[3]
    print(
        f"{args.streams} records a flush, {args.flushes} flushes, writer from {writer_from}: "
        f"writer {result['writer_us_per_record']:.1f} us/record (CPU, this process), "
        f"redis {result['redis_us_per_record']:.1f} us/record"
    )


if __name__ == "__main__":
    main()
