"""Turns the model's streamed text into text deltas and tool-call deltas.

Mistral-Small-3.2 writes tool calls as `[TOOL_CALLS]name[ARGS]{json}` (repeated for parallel calls),
after any text it says first. vLLM's mistral detokenizer keeps `[TOOL_CALLS]` and `[ARGS]` in the text.
Older Mistral models wrote `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`; that form is
understood too, since a model may fall back to it.

Streaming: a call's id and name are sent once `[ARGS]` ends the name, then its arguments in fragments
as they arrive. The complete calls come from `finish`, and they are what counts: output that turns out
malformed (a bad name, arguments that are not a JSON object, a call cut off by the token limit) is
returned as text there, never raised, and is left out of the complete calls.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass

from mistral_serve.common.contract import (
    FUNCTION_NAME,
    FUNCTION_NAME_CHARS,
    FUNCTION_NAME_MAX,
    TOOL_CALL_ID_LENGTH,
)
from mistral_serve.v1 import chat_pb2

TOOL_CALLS_TOKEN = "[TOOL_CALLS]"
ARGS_TOKEN = "[ARGS]"
_ID_ALPHABET = string.ascii_letters + string.digits
# The front door's function-name rule (FUNCTION_NAME): a call named otherwise is returned as text,
# never as a call the caller could not send back.
_NAME_CHAR_RE = re.compile(f"[{FUNCTION_NAME_CHARS}]*")


def new_tool_call_id(seed: str = "") -> str:
    """A call id in the model's format: 9 characters of [a-zA-Z0-9]; the same for the same `seed`."""
    if not seed:
        return "".join(secrets.choice(_ID_ALPHABET) for _ in range(TOOL_CALL_ID_LENGTH))
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(_ID_ALPHABET[b % len(_ID_ALPHABET)] for b in digest[:TOOL_CALL_ID_LENGTH])


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (a marker split across deltas)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class _JsonEnd:
    """Finds where one JSON object or array ends in text fed piece by piece."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed_char(self, ch: str) -> bool:
        """Take one character; True when it closed the outermost value."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
            return False
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class _State(enum.Enum):
    TEXT = enum.auto()  # plain text, watching for [TOOL_CALLS]
    NAME = enum.auto()  # after [TOOL_CALLS], reading a name up to [ARGS]
    ARGS = enum.auto()  # after [ARGS], reading one JSON object
    AFTER_ARGS = enum.auto()  # after a call's arguments: another [TOOL_CALLS], or text
    LEGACY = enum.auto()  # after [TOOL_CALLS], reading the older JSON list of calls


@dataclass(slots=True)
class _Call:
    index: int
    id: str
    name: str
    raw: str  # the model's text of this call, returned as text if the call turns out malformed
    arguments: str = ""


class ToolCallStreamParser:
    """One per request. `feed` each text delta; `finish` once at the end."""

    def __init__(self, call_id_seed: str = "", *, calls_allowed: bool = True) -> None:
        # With a seed (the request id), a call's id depends only on the seed and the call's index, so a
        # worker that resumes a request by feeding it again gives the calls the ids already streamed.
        self._call_id_seed = call_id_seed
        self._calls: list[chat_pb2.FunctionCall] = []
        self._state = _State.TEXT
        self._buf = ""  # received, not yet classified
        self._current: _Call | None = None
        self._json = _JsonEnd()
        self._legacy_raw = ""
        self._next_index = 0
        # False for tool choice NONE: the caller asked for no call, so whatever the model writes is text.
        self._calls_allowed = calls_allowed

    def _call_id(self) -> str:
        return new_tool_call_id(f"{self._call_id_seed}:{self._next_index}" if self._call_id_seed else "")

    @property
    def has_calls(self) -> bool:
        """True once at least one complete, well-formed call was parsed."""
        return bool(self._calls)

    def feed(self, text: str) -> tuple[str, list[chat_pb2.FunctionCallDelta]]:
        """Return the text to show the caller and the tool-call fragments found in `text`."""
        if not self._calls_allowed:
            return text, []
        self._buf += text
        out: list[str] = []
        deltas: list[chat_pb2.FunctionCallDelta] = []
        while self._step(out, deltas):
            pass
        return "".join(out), deltas

    def finish(self) -> tuple[str, list[chat_pb2.FunctionCall]]:
        """Return any text held back and the complete tool calls."""
        held: list[str] = []
        if self._state is _State.NAME:
            held.append(TOOL_CALLS_TOKEN + self._buf)
        elif self._state is _State.ARGS and self._current is not None:
            # Cut off before its arguments closed (e.g. at the token limit).
            held.append(self._current.raw + self._buf)
        elif self._state is _State.LEGACY:
            held.append(self._legacy_raw + self._buf)
        else:
            held.append(self._buf)
        self._buf = ""
        self._state = _State.TEXT
        self._current = None
        return "".join(held), list(self._calls)

    # One transition per call; False when the buffer needs more text before anything can be decided.
    def _step(self, out: list[str], deltas: list[chat_pb2.FunctionCallDelta]) -> bool:
        if self._state is _State.TEXT:
            return self._step_text(out)
        if self._state is _State.NAME:
            return self._step_name(out, deltas)
        if self._state is _State.ARGS:
            return self._step_args(out, deltas)
        if self._state is _State.AFTER_ARGS:
            return self._step_after_args()
        return self._step_legacy(out, deltas)

    def _step_text(self, out: list[str]) -> bool:
        i = self._buf.find(TOOL_CALLS_TOKEN)
        if i >= 0:
            out.append(self._buf[:i])
            self._buf = self._buf[i + len(TOOL_CALLS_TOKEN) :]
            self._state = _State.NAME
            return True
        keep = _partial_suffix(self._buf, TOOL_CALLS_TOKEN)
        out.append(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]
        return False

    def _step_name(self, out: list[str], deltas: list[chat_pb2.FunctionCallDelta]) -> bool:
        stripped = self._buf.lstrip()
        if stripped[:1] in ("[", "{") and not ARGS_TOKEN.startswith(stripped[: len(ARGS_TOKEN)]):
            self._state = _State.LEGACY
            self._legacy_raw = TOOL_CALLS_TOKEN + self._buf[: len(self._buf) - len(stripped)]
            self._buf = stripped
            self._json = _JsonEnd()
            return True
        i = self._buf.find(ARGS_TOKEN)
        if i >= 0:
            name = self._buf[:i].strip()
            if not FUNCTION_NAME.fullmatch(name):
                return self._name_is_text(out)
            raw = TOOL_CALLS_TOKEN + self._buf[: i + len(ARGS_TOKEN)]
            self._current = _Call(index=self._next_index, id=self._call_id(), name=name, raw=raw)
            self._next_index += 1
            deltas.append(
                chat_pb2.FunctionCallDelta(index=self._current.index, id=self._current.id, name=name)
            )
            self._buf = self._buf[i + len(ARGS_TOKEN) :]
            self._state = _State.ARGS
            self._json = _JsonEnd()
            return True
        # No [ARGS] yet: give up early once the text cannot be a name any more.
        candidate = self._buf[: len(self._buf) - _partial_suffix(self._buf, ARGS_TOKEN)].strip()
        if len(candidate) > FUNCTION_NAME_MAX or not _NAME_CHAR_RE.fullmatch(candidate):
            return self._name_is_text(out)
        return False

    def _name_is_text(self, out: list[str]) -> bool:
        out.append(TOOL_CALLS_TOKEN)
        self._state = _State.TEXT
        return True

    def _step_args(self, out: list[str], deltas: list[chat_pb2.FunctionCallDelta]) -> bool:
        call = self._current
        assert call is not None
        fragment: list[str] = []
        consumed = 0
        closed = False
        malformed = False
        for ch in self._buf:
            if self._json.depth == 0 and not call.arguments and not fragment:
                if ch.isspace():
                    consumed += 1
                    call.raw += ch
                    continue
                if ch != "{":
                    malformed = True
                    break
            consumed += 1
            fragment.append(ch)
            if self._json.feed_char(ch):
                closed = True
                break
        piece = "".join(fragment)
        self._buf = self._buf[consumed:]
        call.arguments += piece
        call.raw += piece
        if piece:
            deltas.append(chat_pb2.FunctionCallDelta(index=call.index, arguments_fragment=piece))
        if malformed:
            out.append(call.raw)
            self._current = None
            self._state = _State.TEXT
            return True
        if closed:
            self._state = _State.AFTER_ARGS if self._complete(call, out) else _State.TEXT
            return True
        return False

    def _complete(self, call: _Call, out: list[str]) -> bool:
        """Keep the call if its arguments are a JSON object, else show its text; True if kept."""
        self._current = None
        try:
            parsed = json.loads(call.arguments)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            self._calls.append(
                chat_pb2.FunctionCall(id=call.id, name=call.name, arguments_json=call.arguments)
            )
            return True
        out.append(call.raw)
        return False

    def _step_after_args(self) -> bool:
        stripped = self._buf.lstrip()
        if stripped.startswith(TOOL_CALLS_TOKEN):
            self._buf = stripped[len(TOOL_CALLS_TOKEN) :]
            self._state = _State.NAME
            return True
        if not stripped or TOOL_CALLS_TOKEN.startswith(stripped):
            return False
        # Text after the calls: not the model's format, but it is still the model's answer.
        self._state = _State.TEXT
        return True

    def _step_legacy(self, out: list[str], deltas: list[chat_pb2.FunctionCallDelta]) -> bool:
        for n, ch in enumerate(self._buf):
            if self._json.feed_char(ch):
                value_text = self._buf[: n + 1]
                self._buf = self._buf[n + 1 :]
                self._legacy_raw += value_text
                self._legacy_calls(value_text, out, deltas)
                return True
        self._legacy_raw += self._buf
        self._buf = ""
        return False

    def _legacy_calls(
        self, value_text: str, out: list[str], deltas: list[chat_pb2.FunctionCallDelta]
    ) -> None:
        try:
            value = json.loads(value_text)
        except json.JSONDecodeError:
            value = None
        items = value if isinstance(value, list) else [value]
        calls: list[tuple[str, str]] = []
        for item in items:
            if not isinstance(item, dict):
                break
            name, args = item.get("name"), item.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    break
            if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name) or not isinstance(args, dict):
                break
            calls.append((name, json.dumps(args, ensure_ascii=False)))
        else:
            if calls:
                for name, args_json in calls:
                    call_id, index = self._call_id(), self._next_index
                    self._next_index += 1
                    deltas.append(chat_pb2.FunctionCallDelta(index=index, id=call_id, name=name))
                    deltas.append(chat_pb2.FunctionCallDelta(index=index, arguments_fragment=args_json))
                    self._calls.append(chat_pb2.FunctionCall(id=call_id, name=name, arguments_json=args_json))
                self._legacy_raw = ""
                self._state = _State.AFTER_ARGS
                return
        out.append(self._legacy_raw)
        self._legacy_raw = ""
        self._state = _State.TEXT
