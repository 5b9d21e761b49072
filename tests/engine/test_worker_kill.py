"""Worker SIGKILL under 24 streams with real vLLM (the tiny model) and default settings: every stream
completes token-exact, resumed on the other worker; the longest pause inside a stream is printed.

Two vLLM worker processes, one frontend, a real redis-server; events counted at the raw gRPC stub.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from devtools.local_stack import LocalStack
from mistral_serve.v1 import chat_pb2
from tests.conftest import REPO
from tests.engine.conftest import TinyModel
from tests.engine.vllm_env import tiny_engine_env
from tests.integration.test_nothing_lost import RawStream
from tests.support.requests import chat, events_text
from tests.support.waiting import until

STREAMS = 24
MAX_TOKENS = 48


def request(i: int) -> chat_pb2.ChatRequest:
    r = chat(f"stream number {i}", max_tokens=MAX_TOKENS)
    r.sampling.temperature = 0.0
    return r


async def test_worker_sigkill_with_vllm_resumes_every_stream_token_exact(
    tiny_model: TinyModel, tmp_path: Path
) -> None:
    stack = LocalStack({**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}, tmp_path)
    try:
        redis_server = stack.start_redis()
        common = {"redis_url": redis_server.url, "log_format": "json"}
        engine = {**tiny_engine_env(str(tiny_model.path)), "engine": "vllm"}
        frontend = stack.start("frontend", **common)
        worker_a = stack.start("worker", "worker_a", **common, **engine)
        await stack.ready_all([frontend, worker_a], timeout_s=600)
        port = frontend.ports["grpc"]
        reference = [
            events_text(s.events)
            for s in await asyncio.gather(*(RawStream().run(port, request(i), 300) for i in range(STREAMS)))
        ]
        worker_b = stack.start("worker", "worker_b", **common, **engine)
        await stack.ready_all([worker_b], timeout_s=600)  # idle until A is lost: A takes every job first
        streams = [RawStream() for _ in range(STREAMS)]
        tasks = [asyncio.create_task(s.run(port, request(i), 300)) for i, s in enumerate(streams)]
        await until(lambda: all(len(s.deltas) >= 3 for s in streams), timeout_s=120)
        worker_a.process.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks)
    finally:
        stack.stop_all(grace_s=30, sig=signal.SIGKILL)

    for stream in streams:
        stream.check_shape()
        assert stream.terminal is not None and stream.terminal.WhichOneof("event") == "finished"
    assert [events_text(s.events) for s in streams] == reference
    pauses = sorted(s.longest_pause_s for s in streams)
    print(f"vLLM worker SIGKILL, default lease: longest pause {pauses[-1]:.2f}s, median {pauses[12]:.2f}s")
