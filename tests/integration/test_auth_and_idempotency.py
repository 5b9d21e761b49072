"""API keys from a file (re-read on change), certificate identities, and client_request_id replays."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest

from mistral_serve.client import ChatClient
from mistral_serve.common.env import SettingError
from mistral_serve.frontend import auth
from mistral_serve.frontend.auth import AuthInterceptor, KeyStore, key_digest, parse_digests
from mistral_serve.frontend.errors import PermissionDenied, Unauthenticated
from mistral_serve.v1 import chat_pb2
from tests.integration.conftest import Stack
from tests.integration.test_errors import bad_request_fields
from tests.support.requests import chat, events_text
from tests.support.scripted_engine import ScriptedEngine


def test_keys_file_takes_digests_and_comments_and_refuses_raw_keys(tmp_path: Path) -> None:
    assert parse_digests(["# team a", "", f"{key_digest('a')}  # a's key", key_digest("b").upper()], "f") == {
        key_digest("a"),
        key_digest("b"),
    }
    with pytest.raises(SettingError) as refused:
        parse_digests(["sk-live-secret"], "keys")
    assert "sk-live-secret" not in str(refused.value)


def test_a_rotated_keys_file_is_reread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "api-keys"
    path.write_text(key_digest("old") + "\n")
    store = KeyStore(path=str(path))
    assert store.match("old") == key_digest("old")
    path.write_text(key_digest("new") + "\n")
    os.utime(path, (1, 1))  # a different mtime, as a Secret update gives
    monkeypatch.setattr(auth, "RELOAD_INTERVAL_S", 0.0)
    assert store.match("old") is None
    assert store.match("new") == key_digest("new")


def test_certificate_names_give_identity_or_permission_denied() -> None:
    interceptor = AuthInterceptor(None, mtls=True, allowed_client_names=("billing",))
    assert interceptor.authenticate(None, {"x509_common_name": [b"billing"]}).identity == "cert:billing"
    with pytest.raises(PermissionDenied):
        interceptor.authenticate(None, {"x509_common_name": [b"intruder"]})
    with pytest.raises(Unauthenticated):
        interceptor.authenticate(None, {})


async def test_keys_file_guards_the_service_and_identifies_the_caller(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "api-keys"
    path.write_text(f"# one key\n{key_digest('k1')}\n")
    frontend = await stack.frontend(api_keys_file=str(path))
    await stack.worker()
    events = [e async for e in stack.client(frontend, api_key="k1").stream(chat("keyed", max_tokens=2))]
    assert events_text(events) == "keyed w1"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.client(frontend, api_key="k2", max_attempts=1).chat(chat())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_repeated_client_request_id_replays_the_first_run(stack: Stack) -> None:
    frontend = await stack.frontend()
    engine = ScriptedEngine(tokens_per_s=200.0)  # slow enough that the repeat joins a live run
    await stack.worker(engine)
    client = stack.client(frontend)
    request = chat("once only", max_tokens=6)
    request.client_request_id = "order-42"
    first, second = await asyncio.gather(_events(client, request), _events(client, request))
    third = await _events(client, request)
    for events in (first, second, third):
        assert events[-1].WhichOneof("event") == "finished"
        assert events_text(events) == "once only w1 w2 w3 w4"
    ids = {e.started.request_id for e in (first[0], second[0], third[0])}
    assert len(ids) == 1
    assert engine.started_ids == [ids.pop()]


async def test_the_same_id_for_another_request_is_refused(stack: Stack) -> None:
    frontend = await stack.frontend()
    await stack.worker()
    client = stack.client(frontend)
    request = chat("first", max_tokens=2)
    request.client_request_id = "order-43"
    await _events(client, request)
    other = chat("second", max_tokens=2)
    other.client_request_id = "order-43"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.chat(other)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["client_request_id"]


async def _events(client: ChatClient, request: chat_pb2.ChatRequest) -> list[chat_pb2.ChatEvent]:
    return [e async for e in client.stream(request)]
