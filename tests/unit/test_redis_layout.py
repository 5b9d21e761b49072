"""The key layout keeps a pool in one Cluster slot; the Redis settings block reads its variables."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from mistral_serve.common import keys
from mistral_serve.common.redis_client import RedisConnection, sentinel_address
from mistral_serve.common.settings import SharedSettings


@pytest.mark.parametrize("pool", ["default", "vision", "a.b-c_d"])
def test_every_key_of_a_pool_hashes_to_one_slot(pool: str) -> None:
    names = [
        *keys.request_streams(pool),
        keys.cancel_channel(pool),
        keys.wake_stream(pool, "frontend-1"),
        keys.events_stream(pool, "r1"),
        keys.cancel_flag(pool, "r1"),
        keys.owner_key(pool, "r2"),
        keys.attached_key(pool, "r3"),
        keys.idempotency_key(pool, "caller", "client-id"),
    ]
    assert len(set(names)) == len(names)
    assert {key_slot(name.encode()) for name in names} == {key_slot(keys.pool_tag(pool)[1:-1].encode())}


def test_two_pools_may_live_on_different_slots() -> None:
    assert key_slot(keys.request_stream("default").encode()) != key_slot(
        keys.request_stream("vision").encode()
    )


@pytest.mark.parametrize("pool", ["", "a{b", "a}b"])
def test_a_pool_name_that_would_break_the_tag_is_refused(pool: str) -> None:
    with pytest.raises(ValueError, match="pool"):
        keys.request_stream(pool)


def test_idempotency_keys_separate_callers() -> None:
    assert keys.idempotency_key("p", "alice", "1") != keys.idempotency_key("p", "bob", "1")


def test_the_redis_block_reads_its_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "REDIS_URL": "rediss://mymaster/2",
        "REDIS_MODE": "sentinel",
        "REDIS_SENTINELS": "s0:26379, s1:26380,",
        "REDIS_SENTINEL_MASTER": "primary",
        "REDIS_SENTINEL_PASSWORD": "sp",
        "REDIS_TLS_CA_FILE": "/ca.pem",
        "REDIS_WAIT_REPLICAS": "1",
    }.items():
        monkeypatch.setenv(f"MISTRAL_SERVE_{name}", value)
    settings = SharedSettings.from_env()
    conn = settings.redis_connection
    assert conn == RedisConnection(
        url="rediss://mymaster/2",
        mode="sentinel",
        tls_ca_file="/ca.pem",
        sentinels=("s0:26379", "s1:26380"),
        sentinel_master="primary",
        sentinel_password="sp",
    )
    assert conn.tls and conn.tls_kwargs()["ssl_ca_certs"] == "/ca.pem"
    assert settings.replica_wait.replicas == 1


def test_an_unknown_mode_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISTRAL_SERVE_REDIS_MODE", "ring")
    with pytest.raises(ValueError, match="MISTRAL_SERVE_REDIS_MODE"):
        SharedSettings.from_env()


def test_plain_redis_gets_no_tls_options() -> None:
    assert RedisConnection("redis://h:6379/0", tls_ca_file="/ca.pem").tls_kwargs() == {}


@pytest.mark.parametrize("text", ["host", "host:", ":1", "host:port"])
def test_a_sentinel_address_is_host_and_port(text: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        sentinel_address(text)
