"""The container images, checked without a Docker engine.

The Dockerfiles are parsed by BuildKit's own parser (the `dockerfile` package), which refuses bad
syntax; the tests then pin what the chart relies on: non-root user of the chart's UID, the processes'
entrypoints, the ports, $HOME where the chart mounts a writable volume, a CUDA-free frontend and a
build context that leaves the local venv out.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import dockerfile  # type: ignore[import-not-found]
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "deploy" / "docker"
VALUES = yaml.safe_load((ROOT / "deploy" / "helm" / "mistral-serve" / "values.yaml").read_text())

IMAGES = {
    "frontend": {
        "entrypoint": ("python", "-m", "mistral_serve.frontend"),
        "ports": {VALUES["frontend"]["grpcPort"], VALUES["frontend"]["metricsPort"]},
    },
    "worker": {
        "entrypoint": ("python3", "-m", "mistral_serve.worker"),
        "ports": {VALUES["worker"]["healthPort"], VALUES["worker"]["metricsPort"]},
    },
}


@dataclass(frozen=True)
class Instruction:
    cmd: str
    flags: tuple[str, ...]
    value: tuple[str, ...]


def parse(component: str) -> list[Instruction]:
    commands = dockerfile.parse_file(str(DOCKER_DIR / f"{component}.Dockerfile"))
    return [Instruction(str(c.cmd).upper(), tuple(c.flags), tuple(c.value)) for c in commands]


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, ins in enumerate(instructions) if ins.cmd == "FROM")
    return instructions[last_from:]


def base_images(instructions: list[Instruction]) -> list[str]:
    """Every FROM image, with ARG defaults substituted; stage names are not images."""
    args = dict(a.value[0].split("=", 1) for a in instructions if a.cmd == "ARG" and "=" in a.value[0])
    stages = {ins.value[2] for ins in instructions if ins.cmd == "FROM" and len(ins.value) == 3}
    images = []
    for ins in instructions:
        if ins.cmd == "FROM" and ins.value[0] not in stages:
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ins.value[0]))
    return images


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in (i for i in stage if i.cmd == "ENV"):
        env.update(zip(ins.value[::2], ins.value[1::2], strict=True))
    return env


@pytest.mark.parametrize("component", sorted(IMAGES))
def test_image_runs_as_the_charts_non_root_user(component: str) -> None:
    users = [ins.value[0] for ins in final_stage(parse(component)) if ins.cmd == "USER"]
    assert users, "the final stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric UID lets runAsNonRoot verify it"
    assert int(uid) == VALUES["podSecurityContext"]["runAsUser"]


@pytest.mark.parametrize("component", sorted(IMAGES))
def test_entrypoint_runs_the_package_module(component: str) -> None:
    [entrypoint] = [ins for ins in final_stage(parse(component)) if ins.cmd == "ENTRYPOINT"]
    assert entrypoint.value == IMAGES[component]["entrypoint"]
    module = entrypoint.value[-1]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    # The image runs what `mistral-serve-<component>` (and `make run`) runs.
    assert scripts[f"mistral-serve-{component}"] == f"{module}.__main__:main"


@pytest.mark.parametrize("component", sorted(IMAGES))
def test_image_exposes_the_charts_ports(component: str) -> None:
    exposed = {int(p) for ins in final_stage(parse(component)) if ins.cmd == "EXPOSE" for p in ins.value}
    assert exposed == IMAGES[component]["ports"]


@pytest.mark.parametrize("component", sorted(IMAGES))
def test_base_images_are_pinned(component: str) -> None:
    for image in base_images(parse(component)):
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", image


def test_frontend_image_has_no_cuda() -> None:
    for image in base_images(parse("frontend")):
        assert not re.search(r"cuda|nvidia|vllm|pytorch", image), image


def test_worker_image_builds_on_vllm() -> None:
    assert base_images(parse("worker"))[-1].startswith("vllm/vllm-openai:")


def test_worker_home_is_the_charts_writable_mount() -> None:
    home = env_of(final_stage(parse("worker")))["HOME"]
    template = (
        ROOT / "deploy" / "helm" / "mistral-serve" / "templates" / "deployment-worker.yaml"
    ).read_text()
    assert f"mountPath: {home}\n" in template


@pytest.mark.parametrize("component", sorted(IMAGES))
def test_build_context_holds_what_the_image_copies_and_no_venv(component: str) -> None:
    ignore = (DOCKER_DIR / f"{component}.Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            glob = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(path, glob.replace("**/", "")):
                keep = negated
        return keep

    assert not included(".venv") and not included(".git")
    copies = [ins for ins in parse(component) if ins.cmd == "COPY" and not ins.flags]
    for ins in copies:
        for source in ins.value[:-1]:
            assert (ROOT / source).exists(), source
            assert included(source.rstrip("/")), source
