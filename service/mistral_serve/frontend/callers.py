"""Who a caller is for quotas, fair queueing and metrics, and the keys-file lines that say so.

A keys file line is a key's SHA-256 digest, or a caller identity of another kind (`cert:<certificate
name>`, `mesh:<header value>`), then options, all optional:

    <sha256 digest> name=team-a rps=5 tpm=200000 inflight=8 weight=3
    cert:billing rps=2 weight=2

- `name`: the caller's name (letters, digits, `.`, `_`, `-`; at most 64), on digest lines only. Keys
  that share a name are one caller (a rotated key and its successor): one quota, and each may
  reattach to or cancel the other's requests. A key without a name is `key:<16 hex of its digest>`.
- `rps` (requests per second, may be fractional), `tpm` (tokens per minute: prompt tokens plus
  max_tokens, trued up when the request ends), `inflight` (requests admitted and not yet ended),
  `weight` (share in fair queueing, default 1). Each is `none` for no limit; one not given is the
  default quota's (`MISTRAL_SERVE_DEFAULT_QUOTA`, the same `rps=.. tpm=..` syntax), which callers
  not listed get.

A listed caller (a named key, an identity line) is labelled by its name in the metrics; every other
caller is `other`, so the metrics have one series per listed caller, whoever calls.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from mistral_serve.common import fair_queue
from mistral_serve.common.env import SettingError
from mistral_serve.common.quota import UNLIMITED, Quota

OTHER = "other"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_IDENTITY_KINDS = ("cert:", "mesh:")
_QUOTA_OPTIONS = {
    "rps": "requests_per_s",
    "tpm": "tokens_per_min",
    "inflight": "max_inflight",
    "weight": "weight",
}


@dataclass(frozen=True, slots=True)
class Caller:
    """The caller of an RPC. `identity` names it everywhere: the owner of its requests (only it may
    reattach or cancel them), the key of its quota and its fair-queueing share. It is a listed key's
    name, `key:<16 hex of the key's digest>`, `cert:<certificate name>`, `mesh:<header value>`, or
    `anonymous`. `quota` None is the default quota."""

    identity: str
    quota: Quota | None = None
    listed: bool = False

    @property
    def metric_label(self) -> str:
        return self.identity if self.listed else OTHER


ANONYMOUS = Caller("anonymous")


@dataclass(frozen=True, slots=True)
class Listing:
    """What a keys-file line says of its caller: a name (digest lines) and its quota."""

    quota: Quota
    name: str | None = None


@dataclass(frozen=True, slots=True)
class KeysFile:
    keys: dict[str, Listing] = field(default_factory=dict)  # by digest
    identities: dict[str, Listing] = field(default_factory=dict)  # by `cert:`/`mesh:` identity


def parse_quota(
    options: Iterable[str], *, base: Quota, where: str, allow_name: bool = False
) -> tuple[Quota, str | None]:
    """`rps=.. tpm=.. inflight=.. weight=..` (and `name=..` where allowed) over `base`.

    Errors name `where` and the option, never its value (a line might hold a pasted key)."""
    changes: dict[str, float | int | None] = {}
    name = None
    for option in options:
        key, sep, value = option.partition("=")
        if allow_name and key == "name":
            if not sep or not _NAME.fullmatch(value):
                raise SettingError(f"{where}: option name must be 1-64 letters, digits, '.', '_' or '-'")
            name = value
        elif key in _QUOTA_OPTIONS and sep:
            changes[_QUOTA_OPTIONS[key]] = _limit(key, value, where)
        else:
            known = ", ".join((["name"] if allow_name else []) + list(_QUOTA_OPTIONS))
            shown = key if re.fullmatch(r"[a-z_]{1,20}", key) else "?"
            raise SettingError(f"{where}: unknown option {shown!r} (options are {known}, each as key=value)")
    return replace(base, **changes), name  # type: ignore[arg-type]


def _limit(key: str, value: str, where: str) -> float | int | None:
    if value == "none":
        if key == "weight":
            raise SettingError(f"{where}: option weight must be a positive number")
        return None
    try:
        number = float(value) if key in ("rps", "weight") else int(value)
    except ValueError:
        number = -1
    if not number > 0 or not math.isfinite(number):
        kind = "a positive number" if key in ("rps", "weight") else "a positive integer"
        raise SettingError(f"{where}: option {key} must be {kind} or none")
    if key == "weight" and not fair_queue.MIN_WEIGHT <= number <= fair_queue.MAX_WEIGHT:
        raise SettingError(
            f"{where}: option weight must be from {fair_queue.MIN_WEIGHT} to {fair_queue.MAX_WEIGHT}"
        )
    return number


def parse_default_quota(raw: str | None) -> Quota:
    """`MISTRAL_SERVE_DEFAULT_QUOTA`: empty is no limit."""
    quota, _ = parse_quota((raw or "").split(), base=UNLIMITED, where="MISTRAL_SERVE_DEFAULT_QUOTA")
    return quota


def parse_keys_file(lines: Iterable[str], source: str, *, default: Quota = UNLIMITED) -> KeysFile:
    """A keys file's lines; blank lines and `#` comments skipped. A listed caller's quota is its
    options over `default`."""
    parsed = KeysFile()
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{source}: line {number}"
        first = words[0]
        if first.startswith(_IDENTITY_KINDS) and len(first) > 5:
            quota, _ = parse_quota(words[1:], base=default, where=where)
            parsed.identities[first] = Listing(quota)
            continue
        digest = first.lower()
        if not _DIGEST.fullmatch(digest):
            # Never echo the line: it might be a raw key pasted by mistake.
            raise SettingError(
                f"{where} is not a SHA-256 hex digest (64 hex characters) nor a cert:/mesh: identity"
            )
        quota, name = parse_quota(words[1:], base=default, where=where, allow_name=True)
        parsed.keys[digest] = Listing(quota, name)
    return parsed
