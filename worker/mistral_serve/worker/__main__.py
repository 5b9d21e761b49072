"""`python -m mistral_serve.worker`: run a queue worker with settings from the environment."""

from __future__ import annotations

import uvloop

from mistral_serve.common.logs import configure
from mistral_serve.common.telemetry import setup_tracing

from .app import serve
from .settings import WorkerSettings

# The service name of this process's spans and logs unless OTEL_SERVICE_NAME says otherwise.
SERVICE_NAME = "mistral-serve-worker"


def main() -> None:
    settings = WorkerSettings.from_env()
    configure(settings.log_format, service=SERVICE_NAME)
    tracing = setup_tracing(SERVICE_NAME)
    try:
        uvloop.run(serve(settings))
    finally:
        tracing.shutdown()  # flush the spans still batched


if __name__ == "__main__":
    main()
