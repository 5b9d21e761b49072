"""Engine fixtures: the tiny model, vLLM's own answers for it, and one `VllmEngine` for the session.

vLLM runs on this CPU in one process (see `vllm_env`). Each fixture starts at most one engine and the
reference run finishes before the session's engine starts, so two never compete for the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from tests.engine.tiny_model import REPO, ensure_tiny_model, vision_runtime_available
from tests.engine.vllm_env import configure_vllm_env, tiny_engine_env

if TYPE_CHECKING:
    from mistral_serve.worker.vllm_engine import VllmEngine

configure_vllm_env()

# vLLM's import warns about a torch rename it still uses; the project turns warnings into errors.
ENGINE_WARNING_FILTERS = ["ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/engine/" in item.nodeid:
            item.add_marker(pytest.mark.engine)
            for f in ENGINE_WARNING_FILTERS:
                item.add_marker(pytest.mark.filterwarnings(f))


@dataclass(frozen=True)
class TinyModel:
    path: Path  # the model vLLM runs here
    vision: bool  # whether it has a vision encoder that loads here
    tokenizer_with_images: Path  # a tokenizer with the image config, for prompt checks


@pytest.fixture(scope="session")
def tiny_model() -> TinyModel:
    """The tiny model, built into .cache/ once: with vision where vLLM can load it, else text-only."""
    vision_dir = ensure_tiny_model()
    if vision_runtime_available():
        return TinyModel(vision_dir, True, vision_dir)
    return TinyModel(ensure_tiny_model(text_only=True), False, vision_dir)


@pytest.fixture(scope="session")
def tiny_model_env(tiny_model: TinyModel) -> dict[str, str]:
    """Environment for a worker process that runs the tiny model with `VllmEngine.from_env()`."""
    env = dict(os.environ)
    env.update(tiny_engine_env(str(tiny_model.path)))
    return env


@pytest.fixture(scope="session")
def vllm_reference(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """vLLM's chat-path prompt ids and offline greedy outputs for `conversations.all_conversations()`."""
    out = tmp_path_factory.mktemp("vllm-reference") / "reference.json"
    cmd = [
        sys.executable,
        "-m",
        "tests.engine.vllm_reference",
        "--model",
        str(tiny_model.path),
        "--tokenizer",
        str(tiny_model.tokenizer_with_images),
        "--out",
        str(out),
    ]
    if tiny_model.vision:
        cmd.append("--vision")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"vLLM reference run failed:\n{result.stderr[-4000:]}")
    reference: dict[str, Any] = json.loads(out.read_text())
    return reference


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(
    tiny_model: TinyModel, vllm_reference: dict[str, Any], monkeypatch_session: pytest.MonkeyPatch
) -> AsyncIterator[VllmEngine]:
    """One started `VllmEngine` on the tiny model for the whole session.

    It depends on `vllm_reference` only so that the reference engine has exited before this one starts.
    """
    from mistral_serve.worker.vllm_engine import VllmEngine

    for key, value in tiny_engine_env(str(tiny_model.path)).items():
        monkeypatch_session.setenv(key, value)
    eng = VllmEngine.from_env()
    assert not eng.is_ready()
    await eng.start()
    yield eng
    await eng.shutdown()
    assert not eng.is_ready()


@pytest.fixture(scope="session")
def monkeypatch_session() -> Any:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
