"""docs/architecture.md is the design of record: the files it sends a change to must exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "architecture.md"


def where_a_change_goes() -> dict[str, list[str]]:
    section = PAGE.read_text().split("## Where a change goes", 1)[1].split("\n## ", 1)[0]
    rows = [
        line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| change")
    ]
    table: dict[str, list[str]] = {}
    for row in rows:
        change, files = row.strip("|").split("|", 1)
        table[change.strip()] = re.findall(r"`([\w./-]+\.(?:py|proto|yaml|json|tpl))`", files)
    return table


def test_every_change_of_the_issue_has_its_row() -> None:
    assert set(where_a_change_goes()) == {
        "a new sampling parameter",
        "a new validation rule exposed in the chart",
        "a change of the Redis key layout",
        "a new front door beside gRPC",
        "a new priority band",
        "a new Redis connection setting",
    }


def test_every_file_the_page_names_exists() -> None:
    chart = REPO / "deploy" / "helm" / "mistral-serve"
    frontend = REPO / "service" / "mistral_serve" / "frontend"
    for change, files in where_a_change_goes().items():
        assert files, change
        for name in files:
            candidates = [REPO / name, chart / name, chart / "templates" / name, frontend / name]
            assert any(c.is_file() for c in candidates), f"{change}: {name} does not exist"
