"""Keys-file lines with caller options, the default quota, and who a caller is."""

from __future__ import annotations

from pathlib import Path

import pytest

from mistral_serve.common.env import SettingError
from mistral_serve.common.quota import UNLIMITED, Quota
from mistral_serve.frontend.auth import AuthInterceptor, KeyStore, key_digest
from mistral_serve.frontend.callers import (
    OTHER,
    Caller,
    Listing,
    parse_default_quota,
    parse_keys_file,
)
from mistral_serve.frontend.errors import Unauthenticated

A, B = key_digest("a"), key_digest("b")


def test_options_give_a_name_and_limits_over_the_default() -> None:
    default = Quota(requests_per_s=1.0, tokens_per_min=1000, max_inflight=2)
    parsed = parse_keys_file(
        [
            "# team a, rotated",
            f"{A} name=team-a rps=5 tpm=200000 inflight=8 weight=3  # a's key",
            f"{B.upper()} tpm=none",
            "cert:billing rps=0.5 weight=2",
            "mesh:svc-a inflight=1",
        ],
        "keys",
        default=default,
    )
    assert parsed.keys[A] == Listing(Quota(5.0, 200000, 8, 3.0), "team-a")
    assert parsed.keys[B] == Listing(Quota(1.0, None, 2), None)
    assert parsed.identities == {
        "cert:billing": Listing(Quota(0.5, 1000, 2, 2.0)),
        "mesh:svc-a": Listing(Quota(1.0, 1000, 1)),
    }


@pytest.mark.parametrize(
    ("line", "named"),
    [
        (f"{A} colour=blue", "unknown option 'colour'"),
        (f"{A} rps", "unknown option 'rps'"),
        (f"{A} rps=fast", "option rps must be a positive number"),
        (f"{A} tpm=1.5", "option tpm must be a positive integer"),
        (f"{A} inflight=0", "option inflight must be a positive integer"),
        (f"{A} weight=none", "option weight must be a positive number"),
        (f"{A} weight=5000", "option weight must be from 0.001 to 1000"),
        (f"{A} name=a/b", "option name must be"),
        ("cert:billing name=x", "unknown option 'name'"),
    ],
)
def test_a_bad_option_names_the_line_and_the_option(line: str, named: str) -> None:
    with pytest.raises(SettingError) as refused:
        parse_keys_file(["# first", line], "/etc/keys")
    assert str(refused.value).startswith("/etc/keys: line 2")
    assert named in str(refused.value)


def test_a_pasted_raw_key_is_never_echoed() -> None:
    for line in ["sk-live-secret", f"{A} sk-live-secret", f"{A} name=x rps=sk-live-secret"]:
        with pytest.raises(SettingError) as refused:
            parse_keys_file([line], "keys")
        assert "sk-live-secret" not in str(refused.value)


def test_the_default_quota_uses_the_same_syntax_and_empty_is_unlimited() -> None:
    assert parse_default_quota(None) == UNLIMITED
    assert parse_default_quota("rps=2 inflight=4") == Quota(2.0, None, 4)
    with pytest.raises(SettingError, match="MISTRAL_SERVE_DEFAULT_QUOTA: unknown option 'rpm'"):
        parse_default_quota("rpm=2")


def test_a_named_key_is_its_name_and_an_unnamed_one_keeps_its_digest_identity(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{A} name=team-a rps=5\n{B} inflight=1\ncert:billing tpm=10\n")
    store = KeyStore(path=str(path), default_quota=Quota(max_inflight=9))
    interceptor = AuthInterceptor(store, mtls=False, caller_header="X-Caller")
    assert interceptor.authenticate("Bearer a", {}) == Caller("team-a", Quota(5.0, None, 9), listed=True)
    b = interceptor.authenticate("Bearer b", {})
    assert b == Caller(f"key:{B[:16]}", Quota(max_inflight=1))
    assert b.metric_label == OTHER
    # The mesh header names the caller once the key passed; the file gives a listed one its quota.
    assert interceptor.authenticate("Bearer b", {}, "svc-z") == Caller("mesh:svc-z")
    with pytest.raises(Unauthenticated, match="x-caller header"):
        interceptor.authenticate("Bearer b", {}, "two words")


def test_a_keys_file_of_certificates_gives_quotas_without_asking_for_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("cert:billing tpm=10\n")
    interceptor = AuthInterceptor(KeyStore(path=str(path)), mtls=True)
    caller = interceptor.authenticate(None, {"x509_common_name": [b"billing"]})
    assert caller == Caller("cert:billing", Quota(tokens_per_min=10), listed=True)
    assert caller.metric_label == "cert:billing"
    assert interceptor.authenticate(None, {"x509_common_name": [b"other"]}) == Caller("cert:other")
    # Without mTLS (or a mesh header) to vouch for callers, such a file refuses everyone.
    with pytest.raises(Unauthenticated):
        AuthInterceptor(KeyStore(path=str(path)), mtls=False).authenticate(None, {})
