"""`python -m mistral_serve.frontend`: run the gRPC frontend with settings from the environment."""

from __future__ import annotations

import uvloop

from mistral_serve.common.logs import configure

from .server import serve
from .settings import FrontendSettings


def main() -> None:
    settings = FrontendSettings.from_env()
    configure(settings.log_format)
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
