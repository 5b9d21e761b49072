"""Which tiny model runs here (devtools.tiny_model): the vision one only where torchvision imports."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from devtools import tiny_model


def folders(*, text_only: bool = False) -> object:
    return tiny_model.TEXT_MODEL_DIR if text_only else tiny_model.VISION_MODEL_DIR


def test_a_torchvision_that_fails_to_load_means_the_text_only_model(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def broken(name: str, package: str | None = None) -> ModuleType:
        if name == "torchvision":  # PyPI's CUDA torchvision beside the +cpu torch raises RuntimeError
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", broken)
    assert not tiny_model.vision_runtime_available()
    monkeypatch.setattr(tiny_model, "ensure_tiny_model", folders)
    assert tiny_model.default_tiny_model() == tiny_model.TEXT_MODEL_DIR


def test_a_loadable_torchvision_means_the_vision_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib, "import_module", lambda name, package=None: ModuleType(name))
    assert tiny_model.vision_runtime_available()
    monkeypatch.setattr(tiny_model, "ensure_tiny_model", folders)
    assert tiny_model.default_tiny_model() == tiny_model.VISION_MODEL_DIR
