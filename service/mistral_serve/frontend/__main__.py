"""`python -m mistral_serve.frontend`: run the gRPC frontend with settings from the environment."""

from __future__ import annotations

import uvloop

from mistral_serve.common.logs import configure
from mistral_serve.common.telemetry import setup_tracing

from .pipeline import TokenCounter
from .server import serve
from .settings import FrontendSettings

# The service name of this process's spans and logs unless OTEL_SERVICE_NAME says otherwise.
SERVICE_NAME = "mistral-serve-frontend"


def main() -> None:
    settings = FrontendSettings.from_env()
    configure(settings.log_format, service=SERVICE_NAME)
    tracing = setup_tracing(SERVICE_NAME)
    try:
        uvloop.run(serve(settings, token_counter(settings)))
    finally:
        tracing.shutdown()  # flush the spans still batched


def token_counter(settings: FrontendSettings) -> TokenCounter | None:
    """The model's token counter when MISTRAL_SERVE_TOKENIZER names its tekken.json; else CountTokens
    answers FAILED_PRECONDITION and the token budget is left to the worker."""
    if settings.tokenizer_path is None:
        return None
    from .token_count import TokenCounter as Counter  # loads mistral_common's tokenizer: only when used

    return Counter.from_tokenizer_file(settings.tokenizer_path, model_name=settings.model_name)


if __name__ == "__main__":
    main()
