"""`python -m mistral_serve.worker`: run a queue worker with settings from the environment."""

from __future__ import annotations

import uvloop

from mistral_serve.common.logs import configure

from .app import serve
from .settings import WorkerSettings


def main() -> None:
    settings = WorkerSettings.from_env()
    configure(settings.log_format)
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
