#!/usr/bin/env bash
# GPU check of the real CUDA vLLM path with the tiny model: builds it (no network), starts VllmEngine
# with the card's flags (mistral tokenizer/config/load format) on one GPU, runs one image request and
# a burst of concurrent text requests, and prints tokens/s as the engine streamed them.
# Needs a venv with CUDA vllm, torchvision and this package installed (pip install -e '.[engine-gpu]').
# Usage: bash bench/gpu_check.sh [concurrency] [max_tokens]      Budget: well under 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONCURRENCY=${1:-64}
MAX_TOKENS=${2:-256}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export VLLM_CACHE_ROOT=$PWD/.cache/vllm VLLM_RPC_BASE_PATH=$PWD/.cache/vllm-rpc
mkdir -p "$VLLM_RPC_BASE_PATH"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

[ -f .cache/tiny-model/consolidated.safetensors ] || "$PY" scripts/make_tiny_model.py --out .cache/tiny-model

export MISTRAL_SERVE_MODEL=$PWD/.cache/tiny-model
export MISTRAL_SERVE_TENSOR_PARALLEL=1 MISTRAL_SERVE_MAX_MODEL_LEN=8192
export MISTRAL_SERVE_GPU_MEMORY_UTILIZATION=0.30
# CUDA graphs on (the production default) unless asked otherwise; capture takes well under a minute.
export MISTRAL_SERVE_ENFORCE_EAGER=${MISTRAL_SERVE_ENFORCE_EAGER:-0}

# A file, not stdin: vLLM's spawned engine processes re-import the main module by path.
cat > .cache/gpu_check.py <<'PYEOF'
import asyncio
import sys
import time

from mistral_serve.v1 import chat_pb2 as pb
from mistral_serve.worker.engine import EngineRequest
from mistral_serve.worker.vllm_engine import VllmEngine
from tests.engine.conversations import make_png


def chat(i: int, max_tokens: int, image: bool = False) -> pb.ChatRequest:
    parts = [pb.ContentPart(text=f"Request {i}: tell me a long story.")]
    if image:
        parts.append(pb.ContentPart(image=pb.ImageBytes(data=make_png(), mime_type="image/png")))
    return pb.ChatRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content=parts)],
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )


async def run(engine: VllmEngine, rid: str, request: pb.ChatRequest) -> tuple[int, int]:
    tokens = image_tokens = 0
    async for out in engine.generate(EngineRequest(rid, request)):
        tokens += len(out.token_ids)
        image_tokens = out.image_tokens
    return tokens, image_tokens


async def main(concurrency: int, max_tokens: int) -> None:
    t0 = time.perf_counter()
    engine = VllmEngine.from_env()
    await engine.start()
    print(f"engine start: {time.perf_counter() - t0:.1f} s", flush=True)
    tokens, image_tokens = await run(engine, "image", chat(0, 16, image=True))
    assert image_tokens == 8 and tokens > 0, (tokens, image_tokens)
    print(f"image request: {tokens} tokens, {image_tokens} image tokens", flush=True)
    await run(engine, "warmup", chat(0, 16))
    t1 = time.perf_counter()
    results = await asyncio.gather(*(run(engine, f"r{i}", chat(i, max_tokens)) for i in range(concurrency)))
    elapsed = time.perf_counter() - t1
    total = sum(n for n, _ in results)
    print(f"{concurrency} concurrent x {max_tokens} max tokens: {total} tokens in {elapsed:.2f} s "
          f"= {total / elapsed:.0f} tokens/s direct", flush=True)
    t2 = time.perf_counter()
    single, _ = await run(engine, "single", chat(0, max_tokens))
    print(f"single stream: {single / (time.perf_counter() - t2):.0f} tokens/s", flush=True)
    await engine.shutdown()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
PYEOF
PYTHONPATH=$PWD timeout 540 "$PY" .cache/gpu_check.py "$CONCURRENCY" "$MAX_TOKENS"
