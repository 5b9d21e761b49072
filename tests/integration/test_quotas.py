"""Per-caller quotas at the raw doors: each limit refused with QuotaFailure naming it (gRPC) or 429
naming it (HTTP), the limits held across two frontends on one Redis, and the worker's true-up."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import redis.asyncio as redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mistral_serve.common import keys
from mistral_serve.frontend import auth
from mistral_serve.frontend.auth import key_digest
from mistral_serve.frontend.server import Frontend
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc
from mistral_serve.worker.app import Worker
from tests.integration.conftest import Stack
from tests.integration.test_errors import bad_request_fields
from tests.support.requests import chat
from tests.support.scripted_engine import ScriptedEngine
from tests.support.waiting import until_async

POOL = "default"


@dataclass(frozen=True)
class Refused:
    subject: str
    description: str
    retry_s: float | None


def refused_by_quota(error: grpc.aio.AioRpcError) -> Refused:
    """The QuotaFailure and RetryInfo of a RESOURCE_EXHAUSTED status, as a raw caller reads them."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    status = rpc_status.from_call(error)
    assert status is not None
    failures, delays = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            failures += list(failure.violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delays.append(info.retry_delay.ToMilliseconds() / 1000)
    assert len(failures) == 1
    return Refused(failures[0].subject, failures[0].description, delays[0] if delays else None)


def keys_file(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "api-keys"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Admitted:
    call: Any  # the open grpc.aio stream
    request_id: str


class Door:
    """A raw gRPC stub on one frontend."""

    def __init__(self, frontend: Frontend) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}")
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)

    async def start(
        self, key: str, max_tokens: int = 5, text: str = "hi", timeout_s: float = 30
    ) -> Admitted | grpc.aio.AioRpcError:
        """A stream once admitted (its `started` read), or the AioRpcError that refused it."""
        call = self.stub.ChatStream(
            chat_pb2.ChatStreamRequest(request=chat(text, max_tokens=max_tokens)),
            metadata=bearer(key),
            timeout=timeout_s,
        )
        try:
            first = await read_event(call)
        except grpc.aio.AioRpcError as error:
            return error
        assert first.WhichOneof("event") == "started"
        return Admitted(call, first.started.request_id)


async def read_event(call: Any) -> chat_pb2.ChatEvent:
    """The next event of a raw stream (the end of the stream is a test failure)."""
    event = await call.read()
    assert isinstance(event, chat_pb2.ChatEvent), event
    return event


async def rest(admitted: Admitted | grpc.aio.AioRpcError) -> list[chat_pb2.ChatEvent]:
    assert isinstance(admitted, Admitted), admitted
    events = []
    while (event := await admitted.call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def post_chat(
    frontend: Frontend, headers: dict[str, str], max_tokens: int = 5
) -> tuple[aiohttp.ClientResponse, Any]:
    """A raw non-streaming chat completion on the HTTP door: its response and JSON body."""
    body = {
        "model": frontend.settings.model_name,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        response = await http.post(
            f"http://127.0.0.1:{frontend.http_port}/v1/chat/completions", json=body, headers=headers
        )
        return response, await response.json()


# Each limit, the options that set it, and two max_tokens whose requests cannot both be in (no
# worker runs, so the first stays queued and in flight; no tokenizer: a request costs max_tokens).
LIMITS = [
    ("requests_per_second", "rps=0.01", 5, 5),
    ("tokens_per_minute", "tpm=100", 60, 60),
    ("requests_in_flight", "inflight=1", 5, 5),
]


@pytest.mark.parametrize(("limit", "options", "first_tokens", "second_tokens"), LIMITS)
async def test_a_caller_over_a_limit_gets_quota_failure_naming_it_and_others_go_on(
    stack: Stack, tmp_path: Path, limit: str, options: str, first_tokens: int, second_tokens: int
) -> None:
    path = keys_file(tmp_path, f"{key_digest('ka')} name=team-a {options}", key_digest("kb"))
    frontend = await stack.frontend(api_keys_file=path)
    door = Door(frontend)
    first = await door.start("ka", first_tokens, "first one")
    assert isinstance(first, Admitted), first
    second = await door.start("ka", second_tokens)
    assert isinstance(second, grpc.aio.AioRpcError)
    refused = refused_by_quota(second)
    assert refused.subject == "team-a"
    assert limit in refused.description
    assert refused.retry_s is not None and refused.retry_s > 0
    # Another caller (unlisted: the default quota, no limit) is admitted meanwhile.
    other = await door.start("kb", 3, "other caller")
    assert isinstance(other, Admitted), other
    # Metrics name a listed caller, and every other one `other`.
    assert frontend.metrics is not None
    registry = frontend.metrics.registry
    counts = {
        (caller, result): registry.get_sample_value(
            "mistral_serve_caller_admissions_total", {"pool": POOL, "caller": caller, "result": result}
        )
        for caller, result in (("team-a", "admitted"), ("team-a", limit), ("other", "admitted"))
    }
    assert set(counts.values()) == {1.0}, counts
    # The refusal lost nothing: both admitted requests run to their end once a worker comes.
    await stack.worker()
    for admitted, text in ((first, "first one w1 w2 w3"), (other, "other caller w1")):
        events = await rest(admitted)
        assert events[-1].WhichOneof("event") == "finished"
        assert "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta").startswith(text)
    await door.channel.close()


@pytest.mark.parametrize(("limit", "options", "first_tokens", "second_tokens"), LIMITS)
async def test_the_http_door_answers_429_naming_the_limit_with_retry_after(
    stack: Stack, tmp_path: Path, limit: str, options: str, first_tokens: int, second_tokens: int
) -> None:
    frontend = await stack.frontend(
        api_keys_file=keys_file(tmp_path, f"{key_digest('ka')} name=team-a {options}")
    )
    door = Door(frontend)
    first = await door.start("ka", first_tokens)  # the same key over gRPC: one caller, either door
    assert isinstance(first, Admitted), first
    response, answer = await post_chat(frontend, {"Authorization": "Bearer ka"}, max_tokens=second_tokens)
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert int(response.headers["retry-after-ms"]) > 0
    assert answer["error"]["type"] == "rate_limit_error"
    assert answer["error"]["code"] == limit
    assert limit in answer["error"]["message"]
    first.call.cancel()
    await door.channel.close()


async def test_a_request_that_never_fits_the_token_quota_names_max_tokens(
    stack: Stack, tmp_path: Path
) -> None:
    frontend = await stack.frontend(api_keys_file=keys_file(tmp_path, f"{key_digest('ka')} tpm=100"))
    door = Door(frontend)
    refused = await door.start("ka", 101)
    assert isinstance(refused, grpc.aio.AioRpcError)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused) == ["request.sampling.max_tokens"]
    assert "100 tokens per minute" in (refused.details() or "")
    await door.channel.close()


@pytest.mark.parametrize(("options", "admitted"), [("inflight=2", 2), ("rps=0.01", 1)])
async def test_the_limits_hold_across_two_frontends_on_one_redis(
    stack: Stack, tmp_path: Path, options: str, admitted: int
) -> None:
    path = keys_file(tmp_path, f"{key_digest('ka')} name=team-a {options}")
    doors = [Door(await stack.frontend(api_keys_file=path)) for _ in range(2)]
    results = await asyncio.gather(*(doors[i % 2].start("ka") for i in range(8)))
    calls = [r for r in results if isinstance(r, Admitted)]
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(calls) == admitted
    assert {refused_by_quota(e).subject for e in errors} == {"team-a"}
    for call in calls:
        call.call.cancel()
    for door in doors:
        await door.channel.close()


async def _bucket_level(client: redis.Redis, caller: str) -> float:
    level = await client.hget(keys.quota_keys(POOL, caller)[1], "level")  # type: ignore[misc]
    return float(level) if level is not None else float("inf")


async def test_a_request_that_stops_early_gives_back_the_tokens_it_did_not_use(
    stack: Stack, tmp_path: Path
) -> None:
    frontend = await stack.frontend(
        api_keys_file=keys_file(tmp_path, f"{key_digest('ka')} name=team-a tpm=100")
    )
    await stack.worker(ScriptedEngine(default_tokens=5))  # stops at 5 tokens whatever max_tokens allows
    door = Door(frontend)
    first = await door.start("ka", 80, "hi")  # charged 80
    events = await rest(first)
    usage = events[-1].finished.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (1, 5)
    client = redis.Redis.from_url(stack.redis_url)
    # Charged 80, used 6: 74 come back (plus what refilled, at most 100).
    await until_async(lambda: _level_over(client, "team-a", 100 - 80 + 70))
    # Without the true-up, 20 tokens and some refill would not hold 80 more.
    second = await door.start("ka", 80)
    assert isinstance(second, Admitted), second
    await rest(second)
    await client.aclose()
    await door.channel.close()


async def test_a_cancelled_request_gives_back_its_tokens_and_its_place_in_flight(
    stack: Stack, tmp_path: Path
) -> None:
    path = keys_file(tmp_path, f"{key_digest('ka')} name=team-a tpm=100 inflight=1")
    frontend = await stack.frontend(api_keys_file=path)
    await stack.worker(ScriptedEngine(tokens_per_s=20.0, default_tokens=80))
    door = Door(frontend)
    first = await door.start("ka", 80)
    assert isinstance(first, Admitted), first
    assert (await read_event(first.call)).delta.sequence == 1  # it runs, and has used tokens
    await door.stub.CancelChat(chat_pb2.CancelChatRequest(request_id=first.request_id), metadata=bearer("ka"))
    events = await rest(first)
    assert events[-1].error.code == grpc.StatusCode.CANCELLED.value[0]
    client = redis.Redis.from_url(stack.redis_url)
    await until_async(lambda: _level_over(client, "team-a", 90))
    inflight = keys.quota_keys(POOL, "team-a")[2]
    await until_async(lambda: _zcard_is(client, inflight, 0))
    second = await door.start("ka", 80)
    assert isinstance(second, Admitted), second
    second.call.cancel()
    await client.aclose()
    await door.channel.close()


async def _level_over(client: redis.Redis, caller: str, level: float) -> bool:
    return await _bucket_level(client, caller) > level


async def _zcard_is(client: redis.Redis, key: str, count: int) -> bool:
    return int(await client.zcard(key)) == count


async def test_a_request_the_full_queue_refuses_is_not_charged(stack: Stack, tmp_path: Path) -> None:
    path = keys_file(tmp_path, f"{key_digest('ka')} name=team-a tpm=100")
    frontend = await stack.frontend(api_keys_file=path, max_backlog=1)
    door = Door(frontend)
    first = await door.start("ka", 30)
    assert isinstance(first, Admitted), first
    full = await door.start("ka", 30)
    assert isinstance(full, grpc.aio.AioRpcError)
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue holds its bound" in (full.details() or "")
    client = redis.Redis.from_url(stack.redis_url)
    # 100 - 30 and a little refill; the refused 30 would have left it near 40.
    assert 69 < await _bucket_level(client, "team-a") < 75
    first.call.cancel()
    await client.aclose()
    await door.channel.close()


async def test_a_request_nobody_ran_stops_counting_in_flight_at_its_deadline(
    stack: Stack, tmp_path: Path
) -> None:
    frontend = await stack.frontend(
        api_keys_file=keys_file(tmp_path, f"{key_digest('ka')} name=team-a inflight=2")
    )
    door = Door(frontend)
    # A long request in flight keeps the set (and its expiry) alive: the short one must leave it alone.
    long = await door.start("ka", timeout_s=300)
    assert isinstance(long, Admitted), long
    call = door.stub.ChatStream(
        chat_pb2.ChatStreamRequest(request=chat("no worker", max_tokens=3)),
        metadata=bearer("ka"),
        timeout=1.0,
    )
    assert (await read_event(call)).WhichOneof("event") == "started"
    # Its deadline passes with no worker to end it (and settle its quota): a DEADLINE_EXCEEDED
    # event, or the status, whichever comes first.
    with contextlib.suppress(grpc.aio.AioRpcError):
        ended = await read_event(call)
        assert ended.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]

    async def admitted() -> bool:
        result = await door.start("ka")
        if isinstance(result, Admitted):
            result.call.cancel()
            return True
        assert "requests_in_flight" in refused_by_quota(result).description
        return False

    await until_async(admitted, timeout_s=20)
    long.call.cancel()
    await door.channel.close()


async def test_a_mesh_header_names_the_caller_at_both_doors(stack: Stack, tmp_path: Path) -> None:
    # A keys file of mesh lines only: the mesh vouches for callers, no API key is asked for.
    path = keys_file(tmp_path, "mesh:svc-a inflight=1")
    frontend = await stack.frontend(api_keys_file=path, caller_header="X-Caller")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_pb2.ChatStreamRequest(request=chat("mesh", max_tokens=3))
        held = stub.ChatStream(request, metadata=(("x-caller", "svc-a"),), timeout=30)
        assert (await read_event(held)).WhichOneof("event") == "started"
        response, answer = await post_chat(frontend, {"X-Caller": "svc-a"})
        assert response.status == 429
        assert answer["error"]["code"] == "requests_in_flight"
        other = stub.ChatStream(request, metadata=(("x-caller", "svc-b"),), timeout=30)
        assert (await read_event(other)).WhichOneof("event") == "started"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await read_event(stub.ChatStream(request, metadata=(("x-caller", "svc-a"),), timeout=30))
        assert refused_by_quota(refused.value).subject == "mesh:svc-a"
        held.cancel()
        other.cancel()


async def test_a_quota_changed_in_the_keys_file_holds_once_the_file_is_reread(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rotated Secret: team-a's in-flight limit goes from 1 to 2, and the next admission uses it.
    path = keys_file(tmp_path, f"{key_digest('ka')} name=team-a inflight=1")
    frontend = await stack.frontend(api_keys_file=path)
    door = Door(frontend)

    async def start_over_the_limit() -> None:
        over = await door.start("ka")
        assert isinstance(over, grpc.aio.AioRpcError), over
        assert "requests_in_flight" in refused_by_quota(over).description

    first = await door.start("ka")
    assert isinstance(first, Admitted), first
    await start_over_the_limit()
    keys_file(tmp_path, f"{key_digest('ka')} name=team-a inflight=2")
    os.utime(path, (1, 1))  # a different mtime, as a Secret update gives
    monkeypatch.setattr(auth, "RELOAD_INTERVAL_S", 0.0)
    second = await door.start("ka")
    assert isinstance(second, Admitted), second
    await start_over_the_limit()
    for admitted in (first, second):
        admitted.call.cancel()
    await door.channel.close()


async def _watch(client: redis.Redis, seen: list[tuple[str, str]], ready: asyncio.Event) -> None:
    """Every command Redis runs, as MONITOR reports it (name, whole line), into `seen`, in order."""
    async with client.monitor() as monitor:
        ready.set()
        async for command in monitor.listen():
            line = str(command["command"])
            seen.append((line.split()[0].upper(), line))


@pytest.mark.parametrize(
    ("options", "settled"),
    [("name=team-a rps=100", False), ("name=team-a inflight=5", True)],
)
async def test_a_worker_settles_only_a_request_whose_caller_was_charged_for_it(
    stack: Stack, tmp_path: Path, options: str, settled: bool
) -> None:
    # A requests-per-second charge is never given back: the worker makes no call for that caller.
    frontend = await stack.frontend(api_keys_file=keys_file(tmp_path, f"{key_digest('ka')} {options}"))
    worker = await stack.worker(ScriptedEngine(default_tokens=3))
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    inflight = keys.quota_keys(POOL, "team-a")[2]
    seen: list[tuple[str, str]] = []
    ready = asyncio.Event()
    watcher = asyncio.create_task(_watch(client, seen, ready))
    await ready.wait()
    door = Door(frontend)
    events = await rest(await door.start("ka", 5))
    assert events[-1].WhichOneof("event") == "finished"
    # The worker settles after the terminal write, then lets the job go: once it holds no job, a
    # command sent after that is seen by MONITOR after the settle's, if there was one.
    await until_async(lambda: _no_job(worker))
    await client.get("settle-marker")
    await until_async(lambda: _seen(seen, "GET settle-marker"))
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert any(name == "ZREM" and inflight in line for name, line in seen) == settled, seen
    await client.aclose()
    await door.channel.close()


async def _seen(seen: list[tuple[str, str]], line: str) -> bool:
    return any(line in whole for _, whole in seen)


async def _no_job(worker: Worker) -> bool:
    return worker.consumer.inflight == 0
