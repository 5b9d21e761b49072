"""A worker running vLLM stopped under a running request: a clean stop, the job left for another worker.

The worker is a real process on the tiny model with vLLM's engine in processes of its own (as in a
deployment), and the stop signal goes to the worker alone, as Kubernetes and `make run` send it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import redis

from mistral_serve.common import keys
from mistral_serve.queue.v1 import queue_pb2
from tests.engine.tiny_model import REPO
from tests.support.requests import chat

# Lines a user must not see on a stop.
NOT_CLEAN = ("Traceback", "EngineDeadError", " ERROR ", "CRITICAL")


def test_a_stop_under_a_running_request_is_clean_and_leaves_the_job_unacked(
    tiny_model_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    client: redis.Redis = redis.Redis.from_url(redis_url)
    stream = keys.request_stream("default")
    client.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
    queued = queue_pb2.QueuedRequest(
        request_id="stopped-mid-run",
        request=chat("count to a thousand", max_tokens=1500),
        deadline_unix=time.time() + 600,
    )
    client.xadd(stream, {keys.REQUEST_FIELD: queued.SerializeToString()})
    client.set(keys.attached_key("default", "stopped-mid-run"), b"1", ex=600)  # followed: no detach cancel
    env = {
        **tiny_model_env,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",  # vLLM's engine in processes of its own
        "MISTRAL_SERVE_ENGINE": "vllm",
        "MISTRAL_SERVE_REDIS_URL": redis_url,
        "MISTRAL_SERVE_HEALTH_HOST": "127.0.0.1",
        "MISTRAL_SERVE_HEALTH_PORT": "0",
        "MISTRAL_SERVE_METRICS_PORT": "off",
        "MISTRAL_SERVE_DRAIN_GRACE_S": "1",  # far less than the request needs
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "mistral_serve.worker"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        end = time.monotonic() + 300
        while (
            cast(int, client.xlen(keys.events_stream("default", "stopped-mid-run"))) < 2
        ):  # the engine is generating
            assert worker.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < end, "the request never started"
            time.sleep(0.2)
        signalled_at = log.stat().st_size
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    after = log.read_bytes()[signalled_at:].decode(errors="replace")
    assert "draining" in after
    assert [line for line in after.splitlines() if any(mark in line for mark in NOT_CLEAN)] == [], after[
        -4000:
    ]
    # Not finished here: still pending in the group, for another worker to resume.
    assert cast(dict[str, Any], client.xpending(stream, keys.WORKER_GROUP))["pending"] == 1
    client.close()
