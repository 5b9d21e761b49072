"""Ports a process bound reach its launcher, and the launcher's Redis survives a lost port race."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import local_stack
from mistral_serve.common.ports import PORT_FILE_ENV, report_ports


def test_bound_ports_are_written_whole_to_the_named_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "frontend.ports"
    monkeypatch.setenv(PORT_FILE_ENV, str(path))
    report_ports(grpc=41234, health=None, metrics=39871)
    assert json.loads(path.read_text()) == {"grpc": 41234, "metrics": 39871}
    assert list(tmp_path.iterdir()) == [path]  # no partial file left behind


def test_without_the_setting_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PORT_FILE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    report_ports(grpc=1)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_redis_starts_on_another_port_when_its_first_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken_port: int
) -> None:
    picks = iter([taken_port, local_stack.free_port()])
    monkeypatch.setattr(local_stack, "free_port", lambda: next(picks))
    server = local_stack.start_redis(tmp_path)
    try:
        assert server.port != taken_port
    finally:
        server.stop()


def test_redis_on_a_taken_fixed_port_is_an_error(tmp_path: Path, taken_port: int) -> None:
    with pytest.raises(local_stack.StackError, match=str(taken_port)):
        local_stack.start_redis(tmp_path, port=taken_port)
