"""What the frontend and the worker must agree on, each rule in one place.

The frontend validates against these rules and the worker relies on them; neither restates them.
The Redis key layout has its own module (`keys`), the sampling parameters their table (`sampling`).
"""

from __future__ import annotations

import re

from google.rpc import code_pb2

from mistral_serve.v1 import chat_pb2

# The model the service serves unless MISTRAL_SERVE_MODEL names another.
DEFAULT_MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
# The model card's context length (prompt + output) and image limit.
DEFAULT_CONTEXT_LENGTH = 131072
DEFAULT_MAX_IMAGES_PER_PROMPT = 10

# mistral_common's rules (protocol/instruct/validator.py) for call ids and function names. The
# tool-call parser uses the same name rule, so a call it emits is one the caller may send back.
TOOL_CALL_ID_LENGTH = 9
TOOL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
FUNCTION_NAME_CHARS = "a-zA-Z0-9_-"
FUNCTION_NAME_MAX = 64
FUNCTION_NAME = re.compile(f"[{FUNCTION_NAME_CHARS}]{{1,{FUNCTION_NAME_MAX}}}")
FUNCTION_NAME_RULE = f"a function name is 1-{FUNCTION_NAME_MAX} characters of [{FUNCTION_NAME_CHARS}]"


def model_tool_call_id(call_id: str) -> str:
    """The id the model sees for a caller's call id: OpenAI-style ids (`call_...`, longer than the
    model's 9 characters) keep their last 9, as vLLM's mistral tokenizer truncates them."""
    return call_id[-TOOL_CALL_ID_LENGTH:] if len(call_id) > TOOL_CALL_ID_LENGTH else call_id


# Finish reasons by the names the engine, spans (gen_ai.response.finish_reasons) and OpenAI use.
FINISH_REASONS: dict[str, chat_pb2.FinishReason.ValueType] = {
    "stop": chat_pb2.FINISH_REASON_STOP,
    "length": chat_pb2.FINISH_REASON_LENGTH,
    "tool_calls": chat_pb2.FINISH_REASON_TOOL_CALLS,
    "abort": chat_pb2.FINISH_REASON_ABORTED,
}
_FINISH_REASON_NAMES = {value: name for name, value in FINISH_REASONS.items()}


def finish_reason_name(reason: chat_pb2.FinishReason.ValueType) -> str:
    return _FINISH_REASON_NAMES.get(reason, "unknown")


def code_name(code: int) -> str:
    """`google.rpc.Code` name of a terminal error's code (e.g. "UNAVAILABLE"), or the number."""
    try:
        return str(code_pb2.Code.Name(code))
    except ValueError:
        return str(code)


def error_event(code: int, message: str, *, retryable: bool = False) -> chat_pb2.ChatEvent:
    """A stream's terminal `error` event; `code` is a `google.rpc.Code`."""
    return chat_pb2.ChatEvent(error=chat_pb2.Error(code=code, message=message, retryable=retryable))


class BudgetProblem(ValueError):
    """The prompt and max_tokens cannot fit the context; `field` is "messages" or "sampling.max_tokens"."""

    def __init__(self, field: str, description: str) -> None:
        self.field = field
        self.description = description
        super().__init__(description)


def max_tokens_problem(max_tokens: int, context_length: int) -> str | None:
    """Why `max_tokens` alone can never be served, or None (a prompt's size clamps it later)."""
    if max_tokens < 1:
        return "max_tokens must be at least 1"
    if max_tokens > context_length:
        return f"max_tokens is {max_tokens}; the context holds {context_length} tokens, prompt included"
    return None


def new_tokens_allowed(prompt_tokens: int, max_tokens: int | None, context_length: int) -> int:
    """Tokens a request may generate: max_tokens clamped to the room the prompt leaves, as vLLM does.

    Raises BudgetProblem when the prompt leaves no room, or max_tokens alone is over the context.
    """
    if max_tokens is not None:
        problem = max_tokens_problem(max_tokens, context_length)
        if problem:
            raise BudgetProblem("sampling.max_tokens", problem)
    room = context_length - prompt_tokens
    if room <= 0:
        raise BudgetProblem(
            "messages",
            f"the prompt is {prompt_tokens} tokens; the context holds {context_length}, leaving no room "
            "to answer; shorten the prompt",
        )
    return room if max_tokens is None else min(max_tokens, room)
