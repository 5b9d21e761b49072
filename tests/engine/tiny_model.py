"""Where the tests find the tiny model, built once by `scripts/make_tiny_model.py` when missing."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VISION_MODEL_DIR = REPO / ".cache" / "tiny-model"
TEXT_MODEL_DIR = REPO / ".cache" / "tiny-model-text"


def ensure_tiny_model(*, text_only: bool = False) -> Path:
    """The tiny model's folder, built on first use (a few seconds, no network)."""
    out = TEXT_MODEL_DIR if text_only else VISION_MODEL_DIR
    if not (out / "consolidated.safetensors").is_file():
        cmd = [sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), "--out", str(out)]
        subprocess.run([*cmd, "--text-only"] if text_only else cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def vision_runtime_available() -> bool:
    """Whether vLLM's Pixtral/Mistral-3 code can be imported here.

    vLLM's Pixtral model imports transformers' Pixtral image processor, which needs torchvision. On
    the CPU build (torch +cpu) the only torchvision wheels PyPI has are CUDA builds whose `_C.so`
    needs `libtorch_cuda.so`, so torchvision fails to import (`operator torchvision::nms does not
    exist`), or it is absent; either way vision cannot load and the text-only tiny model is used.
    """
    try:
        importlib.import_module("torchvision")
    except Exception:
        return False
    return True
