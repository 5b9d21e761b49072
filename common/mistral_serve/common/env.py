"""Typed readers of environment variables, shared by the frontend's and the worker's settings."""

from __future__ import annotations

import os

ENV_PREFIX = "MISTRAL_SERVE_"


class SettingError(ValueError):
    """A setting has a value that cannot be used."""


def env_str(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def env_opt_str(name: str) -> str | None:
    return os.environ.get(ENV_PREFIX + name) or None


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(ENV_PREFIX + name)
    try:
        value = default if raw is None or raw == "" else int(raw)
    except ValueError as exc:
        raise SettingError(f"{ENV_PREFIX}{name}={raw!r} is not an integer") from exc
    if minimum is not None and value < minimum:
        raise SettingError(f"{ENV_PREFIX}{name}={value} is below its minimum {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(ENV_PREFIX + name)
    try:
        value = default if raw is None or raw == "" else float(raw)
    except ValueError as exc:
        raise SettingError(f"{ENV_PREFIX}{name}={raw!r} is not a number") from exc
    if minimum is not None and value < minimum:
        raise SettingError(f"{ENV_PREFIX}{name}={value} is below its minimum {minimum}")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingError(f"{ENV_PREFIX}{name}={raw!r} is not a boolean")


def env_port_or_off(name: str, default: int | None) -> int | None:
    """A port number (0 picks a free one), or None when the variable says `off`."""
    raw = os.environ.get(ENV_PREFIX + name, "").strip()
    if raw.lower() in ("off", "none", "disabled"):
        return None
    value = env_int(name, -1 if default is None else default, minimum=-1)
    return None if value < 0 else value
