"""Finds the tool-call special tokens of a streamed output by token id and marks them in its text.

The detokenizer writes `[TOOL_CALLS]` and `[ARGS]` into the text as their names (vLLM keeps them even
with `skip_special_tokens`) and `[CALL_ID]` as nothing, so the text alone cannot tell a special token
from ordinary tokens that spell the same characters. Their ids can: `MarkLocator` takes each output's
new token ids and text and says where in that text each special token's own text lies (`TokenMark`),
which is what the tool-call parser reads as a marker. Everything else stays text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mistral_common.exceptions import TokenizerException
from mistral_common.tokens.tokenizers.base import SpecialTokens

from mistral_serve.common.prompts import Tokenizer

from .engine import Marker, TokenMark

# The detokenizer's text of a run of output token ids, as it streams them.
Detokenize = Callable[[Sequence[int]], str]

_SPECIAL_NAMES = {
    Marker.TOOL_CALLS: SpecialTokens.tool_calls,
    Marker.ARGS: SpecialTokens.args,
    Marker.CALL_ID: SpecialTokens.call_id,
}


@dataclass(frozen=True, slots=True)
class ToolCallTokens:
    """The ids of the tool-call special tokens of one tokenizer."""

    ids: Mapping[int, Marker]

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ToolCallTokens:
        """Looked up by name in the tokenizer; a tokenizer without one (older versions lack [ARGS] and
        [CALL_ID]) simply has no such marker."""
        inner = tokenizer.instruct_tokenizer.tokenizer
        ids: dict[int, Marker] = {}
        for marker, name in _SPECIAL_NAMES.items():
            try:
                ids[inner.get_special_token(name.value)] = marker
            except (TokenizerException, ValueError, KeyError):
                continue
        return cls(ids)


class MarkLocator:
    """One per streamed output: turns (new token ids, new text) into (text, marks) for the parser.

    A special token's place in the text is the length of the detokenized text before it. The text
    handed on may lag the ids (vLLM holds back text that could begin a stop string), so a mark is
    given with the output whose text reaches its end, and the part of a special token's text that
    arrived without its end is held back to the next output.
    """

    def __init__(self, tokens: ToolCallTokens, detokenize: Detokenize) -> None:
        self._tokens = tokens
        self._detokenize = detokenize
        self._ids: list[int] = []
        self._pending: list[TokenMark] = []  # in the whole output's text, not yet handed on
        self._sent = 0  # characters of the whole output's text handed on
        self._held = ""  # text received but held back (a special token's text, cut)

    def add(self, token_ids: Sequence[int], text: str) -> tuple[str, tuple[TokenMark, ...]]:
        for token_id in token_ids:
            marker = self._tokens.ids.get(token_id)
            if marker is not None:
                start = len(self._detokenize(self._ids))
                end = len(self._detokenize([*self._ids, token_id]))
                self._pending.append(TokenMark(marker, start, end))
            self._ids.append(token_id)
        return self._release(self._held + text)

    def flush(self) -> str:
        """Text still held at the end of the output (a stop string cut a special token's text)."""
        held, self._held = self._held, ""
        self._sent += len(held)
        self._pending.clear()
        return held

    def _release(self, text: str) -> tuple[str, tuple[TokenMark, ...]]:
        reach = self._sent + len(text)
        marks: list[TokenMark] = []
        cut = len(text)
        while self._pending:
            mark = self._pending[0]
            if mark.end > reach:
                if mark.start < reach:
                    cut = mark.start - self._sent  # hold back the special token's partial text
                break
            self._pending.pop(0)
            # Never before text already handed on (a decode that disagrees with the stream, such as a
            # character cut between tokens, must not move a mark into the past).
            start, end = mark.start - self._sent, mark.end - self._sent
            shift = max((marks[-1].end if marks else 0) - start, 0)
            marks.append(TokenMark(mark.marker, start + shift, min(end + shift, len(text))))
        text, self._held = text[:cut], text[cut:]
        self._sent += len(text)
        return text, tuple(marks)


def locate(
    tokens: ToolCallTokens, detokenize: Detokenize, token_ids: Sequence[int]
) -> tuple[str, tuple[TokenMark, ...]]:
    """The text and marks of a whole run of token ids (a resumed request's streamed tokens)."""
    locator = MarkLocator(tokens, detokenize)
    text, marks = locator.add(token_ids, detokenize(token_ids))
    return text + locator.flush(), marks
