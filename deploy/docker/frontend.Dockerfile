# syntax=docker/dockerfile:1
# The gRPC frontend: slim Python, no CUDA. Build from the repository root:
#   docker build -f deploy/docker/frontend.Dockerfile -t mistral-serve/frontend:0.1.0 .
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# protoc lives in its own venv so it stays out of the runtime one.
RUN python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install "grpcio-tools>=1.70,<2" \
 && python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY common/ common/
COPY service/ service/
COPY worker/ worker/
COPY client/ client/
# The protobuf code is generated, never committed: build it the way `make` does.
RUN /opt/protoc/bin/python -m grpc_tools.protoc -I protos --python_out=common --grpc_python_out=common \
      $(find protos -name '*.proto') \
 && /opt/venv/bin/pip install .

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/mistral --shell /usr/sbin/nologin mistral
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/mistral \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/mistral
# gRPC (ChatService, health, reflection) and Prometheus /metrics.
EXPOSE 50051 9090
ENTRYPOINT ["python", "-m", "mistral_serve.frontend"]
