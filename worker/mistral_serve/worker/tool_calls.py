"""Turns the model's streamed output into text deltas and tool-call deltas.

Mistral-Small-3.2 writes tool calls as `[TOOL_CALLS]name[ARGS]{json}` (repeated for parallel calls),
after any text it says first; newer tokenizers put `[CALL_ID]id` before `[ARGS]`. Older Mistral
models wrote `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`; that form is understood too,
since a model may fall back to it.

The markers are special tokens, found by token id (`tool_call_tokens.py`) and given to `feed` as
`TokenMark`s beside the text. Text outside the marks is ordinary tokens' text and stays text, even
where it spells "[TOOL_CALLS]": a model that writes those characters as ordinary tokens (or quotes
them) starts no call. A call's id is ours (seeded, see below); an id the model writes after
`[CALL_ID]` is read and dropped.

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
from collections.abc import Sequence
from dataclasses import dataclass

from mistral_serve.common.contract import (
    FUNCTION_NAME,
    FUNCTION_NAME_CHARS,
    FUNCTION_NAME_MAX,
    TOOL_CALL_ID_LENGTH,
)
from mistral_serve.v1 import chat_pb2

from .engine import Marker, TokenMark

TOOL_CALLS_TOKEN = Marker.TOOL_CALLS.value
ARGS_TOKEN = Marker.ARGS.value
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
    TEXT = enum.auto()  # plain text, waiting for a [TOOL_CALLS] token
    NAME = enum.auto()  # after [TOOL_CALLS], reading a name up to [ARGS] (or [CALL_ID])
    CALL_ID = enum.auto()  # after [CALL_ID], reading the model's id of the call up to [ARGS]
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
    """One per request. `feed` each output's text and marks; `finish` once at the end."""

    def __init__(self, call_id_seed: str = "", *, calls_allowed: bool = True) -> None:
        # With a seed (the request id), a call's id depends only on the seed and the call's index, so a
        # worker that resumes a request by feeding it again gives the calls the ids already streamed.
        self._call_id_seed = call_id_seed
        self._calls: list[chat_pb2.FunctionCall] = []
        self._state = _State.TEXT
        self._raw = ""  # the model's text since [TOOL_CALLS] (NAME, CALL_ID, LEGACY), or blanks (AFTER_ARGS)
        self._name = ""  # NAME: the text read as the name so far
        self._current: _Call | None = None
        self._json = _JsonEnd()
        self._next_index = 0
        # False for tool choice NONE: the caller asked for no call, so whatever the model writes is text.
        self._calls_allowed = calls_allowed

    def _call_id(self) -> str:
        return new_tool_call_id(f"{self._call_id_seed}:{self._next_index}" if self._call_id_seed else "")

    @property
    def has_calls(self) -> bool:
        """True once at least one complete, well-formed call was parsed."""
        return bool(self._calls)

    def feed(
        self, text: str, marks: Sequence[TokenMark] = ()
    ) -> tuple[str, list[chat_pb2.FunctionCallDelta]]:
        """Return the text to show the caller and the tool-call fragments found in one output."""
        if not self._calls_allowed:
            return text, []
        out: list[str] = []
        deltas: list[chat_pb2.FunctionCallDelta] = []
        at = 0
        for mark in marks:
            self._text(text[at : mark.start], out, deltas)
            self._marker(mark.marker, text[mark.start : mark.end], out, deltas)
            at = mark.end
        self._text(text[at:], out, deltas)
        return "".join(out), deltas

    def finish(self) -> tuple[str, list[chat_pb2.FunctionCall]]:
        """Return any text held back and the complete tool calls."""
        held: list[str] = []
        self._drop_partial(held)
        if self._state is _State.AFTER_ARGS:
            held.append(self._raw)
        self._raw = ""
        self._state = _State.TEXT
        return "".join(held), list(self._calls)

    def _drop_partial(self, out: list[str]) -> None:
        """A call begun and not complete is the model's text: show it, back to TEXT."""
        if self._state in (_State.NAME, _State.CALL_ID, _State.LEGACY):
            out.append(self._raw)
        elif self._state is _State.ARGS and self._current is not None:
            out.append(self._current.raw)  # e.g. cut off at the token limit
        else:
            return
        self._raw, self._name, self._current = "", "", None
        self._state = _State.TEXT

    def _marker(
        self, marker: Marker, text: str, out: list[str], deltas: list[chat_pb2.FunctionCallDelta]
    ) -> None:
        state = self._state
        if marker is Marker.ARGS and state in (_State.NAME, _State.CALL_ID):
            self._begin_args(text, out, deltas)
            return
        if marker is Marker.CALL_ID and state is _State.NAME and FUNCTION_NAME.fullmatch(self._name.strip()):
            self._raw += text
            self._state = _State.CALL_ID
            return
        # Blanks between parallel calls are dropped; anything else begun is the model's text.
        if not (marker is Marker.TOOL_CALLS and state is _State.AFTER_ARGS):
            self._drop_partial(out)
            if self._state is _State.AFTER_ARGS:
                out.append(self._raw)
        if marker is Marker.TOOL_CALLS:
            self._raw, self._name = text, ""
            self._state = _State.NAME
        else:
            out.append(text)  # a stray [ARGS] or [CALL_ID]: the model's text
            self._raw = ""
            self._state = _State.TEXT

    def _begin_args(self, text: str, out: list[str], deltas: list[chat_pb2.FunctionCallDelta]) -> None:
        name = self._name.strip()
        if not FUNCTION_NAME.fullmatch(name):
            self._raw += text
            self._drop_partial(out)
            return
        self._current = _Call(index=self._next_index, id=self._call_id(), name=name, raw=self._raw + text)
        self._next_index += 1
        deltas.append(chat_pb2.FunctionCallDelta(index=self._current.index, id=self._current.id, name=name))
        self._raw, self._name = "", ""
        self._state = _State.ARGS
        self._json = _JsonEnd()

    # Ordinary text, in whatever state: each step takes what it can and says what is left.
    def _text(self, text: str, out: list[str], deltas: list[chat_pb2.FunctionCallDelta]) -> None:
        while text:
            if self._state is _State.TEXT:
                out.append(text)
                return
            if self._state is _State.NAME:
                text = self._name_text(text, out)
            elif self._state is _State.CALL_ID:
                self._raw += text
                return
            elif self._state is _State.ARGS:
                text = self._args_text(text, out, deltas)
            elif self._state is _State.AFTER_ARGS:
                text = self._after_args_text(text, out)
            else:
                text = self._legacy_text(text, out, deltas)

    def _name_text(self, text: str, out: list[str]) -> str:
        name = self._name + text
        stripped = name.lstrip()
        if stripped[:1] in ("[", "{"):
            # The older form: a JSON list (or object) of calls right after [TOOL_CALLS].
            # (What was read as the name before is blanks, already in the raw text.)
            self._raw += text[: len(text) - len(stripped)]
            self._name = ""
            self._state = _State.LEGACY
            self._json = _JsonEnd()
            return stripped
        self._raw += text
        self._name = name
        # Give up early once the text cannot be a name any more.
        if len(name.strip()) > FUNCTION_NAME_MAX or not _NAME_CHAR_RE.fullmatch(name.strip()):
            self._drop_partial(out)
        return ""

    def _args_text(self, text: str, out: list[str], deltas: list[chat_pb2.FunctionCallDelta]) -> str:
        call = self._current
        assert call is not None
        fragment: list[str] = []
        consumed = 0
        closed = False
        malformed = False
        for ch in text:
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
        call.arguments += piece
        call.raw += piece
        if piece:
            deltas.append(chat_pb2.FunctionCallDelta(index=call.index, arguments_fragment=piece))
        if malformed:
            self._drop_partial(out)
        elif closed:
            self._complete(call, out)
        return text[consumed:]

    def _complete(self, call: _Call, out: list[str]) -> None:
        """Keep the call if its arguments are a JSON object, else show its text."""
        self._current = None
        try:
            parsed = json.loads(call.arguments)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            self._calls.append(
                chat_pb2.FunctionCall(id=call.id, name=call.name, arguments_json=call.arguments)
            )
            self._raw = ""
            self._state = _State.AFTER_ARGS
            return
        out.append(call.raw)
        self._state = _State.TEXT

    def _after_args_text(self, text: str, out: list[str]) -> str:
        stripped = text.lstrip()
        self._raw += text[: len(text) - len(stripped)]
        if stripped:
            # Text after the calls: not the model's format, but it is still the model's answer.
            out.append(self._raw)
            self._raw = ""
            self._state = _State.TEXT
        return stripped

    def _legacy_text(self, text: str, out: list[str], deltas: list[chat_pb2.FunctionCallDelta]) -> str:
        for n, ch in enumerate(text):
            if self._json.feed_char(ch):
                self._raw += text[: n + 1]
                self._name += text[: n + 1]
                self._legacy_calls(out, deltas)
                return text[n + 1 :]
        self._raw += text
        self._name += text  # LEGACY: the JSON value so far
        return ""

    def _legacy_calls(self, out: list[str], deltas: list[chat_pb2.FunctionCallDelta]) -> None:
        try:
            value = json.loads(self._name)
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
                self._raw, self._name = "", ""
                self._state = _State.AFTER_ARGS
                return
        self._drop_partial(out)
