"""Where the tests find the tiny model: devtools.tiny_model, shared with `make run` and the benchmarks."""

from devtools.tiny_model import (
    REPO,
    TEXT_MODEL_DIR,
    VISION_MISSING,
    VISION_MODEL_DIR,
    ensure_tiny_model,
    vision_runtime_available,
)

__all__ = [
    "REPO",
    "TEXT_MODEL_DIR",
    "VISION_MISSING",
    "VISION_MODEL_DIR",
    "ensure_tiny_model",
    "vision_runtime_available",
]
