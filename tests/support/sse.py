"""Reading the HTTP door's SSE streams in tests, from raw bytes (no OpenAI client in between)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass
class SseEvent:
    id: str | None
    data: str

    @property
    def json(self) -> Any:
        return json.loads(self.data)


async def read_events(response: aiohttp.ClientResponse, *, stop_after: int | None = None) -> list[SseEvent]:
    """The events of `response` until the stream ends (or `stop_after` events were read)."""
    events: list[SseEvent] = []
    event_id: str | None = None
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            events.append(SseEvent(event_id, "\n".join(data)))
            event_id, data = None, []
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


def joined_text(events: list[SseEvent]) -> str:
    out = []
    for event in events:
        if event.data == "[DONE]":
            continue
        for choice in event.json.get("choices", []):
            out.append(choice["delta"].get("content") or "")
    return "".join(out)


def joined_tool_calls(events: list[SseEvent]) -> list[dict[str, Any]]:
    """Tool-call fragments joined by index, as OpenAI clients assemble them."""
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if event.data == "[DONE]":
            continue
        for choice in event.json.get("choices", []):
            for fragment in choice["delta"].get("tool_calls", []):
                call = calls.setdefault(
                    fragment["index"],
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if "id" in fragment:
                    call["id"] = fragment["id"]
                    call["type"] = fragment["type"]
                function = fragment.get("function", {})
                call["function"]["name"] += function.get("name", "")
                call["function"]["arguments"] += function.get("arguments", "")
    return [calls[i] for i in sorted(calls)]
