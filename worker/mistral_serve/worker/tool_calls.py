"""Turns the model's streamed text into text deltas and tool-call deltas.

Mistral-Small-3.2 writes tool calls as `[TOOL_CALLS]name[ARGS]{json}` (repeated for parallel calls).
"""

from __future__ import annotations

from mistral_serve.v1 import chat_pb2

TOOL_CALLS_TOKEN = "[TOOL_CALLS]"


class ToolCallStreamParser:
    """One per request. `feed` each text delta; `finish` once at the end."""

    def __init__(self) -> None:
        self._calls: list[chat_pb2.FunctionCall] = []

    def feed(self, text: str) -> tuple[str, list[chat_pb2.FunctionCallDelta]]:
        """Return the text to show the caller and the tool-call fragments found in `text`."""
        return text, []

    def finish(self) -> tuple[str, list[chat_pb2.FunctionCall]]:
        """Return any text held back and the complete tool calls."""
        return "", list(self._calls)
