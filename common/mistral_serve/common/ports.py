"""The ports a process bound, reported to whoever started it.

A launcher (tests, benchmarks, `make run`) starts a frontend or worker with its ports at 0 so that the
kernel picks free ones, and names a file in MISTRAL_SERVE_PORT_FILE; the process writes there the ports
it bound once it listens. Picking a free port in the launcher and passing it on would race with every
other process on the machine. Read here rather than in the settings: it is a launcher's hook, not a
setting of the service, and both processes share it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PORT_FILE_ENV = "MISTRAL_SERVE_PORT_FILE"


def report_ports(**ports: int | None) -> None:
    """Write `{"grpc": 50051, "metrics": 9090, ...}` (the bound ones) to MISTRAL_SERVE_PORT_FILE, if set.

    Written whole and renamed into place, so that a reader never sees half a file."""
    path = os.environ.get(PORT_FILE_ENV)
    if not path:
        return
    bound = {name: port for name, port in ports.items() if port is not None}
    partial = Path(f"{path}.partial")
    partial.write_text(json.dumps(bound))
    partial.replace(path)
