"""The sampling parameters, one row each: what the frontend checks, what vLLM gets, what spans show.

A new sampling parameter is its field in `chat.proto`'s `SamplingParams` plus one row here: the
frontend's validation, the worker's `SamplingParams` and the generation span's attributes all read
this table. `max_tokens` and `stop` have rules of their own (the context budget; the number and length
of stop sequences, which are settings) and are checked where those live, but are mapped here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mistral_serve.v1 import chat_pb2

# The model card's recommendation, applied when a request leaves temperature unset.
DEFAULT_TEMPERATURE = 0.15
# The most alternatives per token a request may ask for (OpenAI's bound; vLLM's default cap).
MAX_TOP_LOGPROBS = 20
INT32_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Bound:
    low: float
    high: float
    low_open: bool = False  # (low, high] rather than [low, high]

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


@dataclass(frozen=True, slots=True)
class SamplingParameter:
    field: str  # in chat.proto's SamplingParams (optional scalar, or repeated)
    bound: Bound | None = None  # None: any value the proto type holds
    default: float | None = None  # filled in at the front door when unset
    vllm_kwarg: str | None = None  # vllm.SamplingParams keyword; None: computed by the engine
    span_attribute: str | None = None  # on the generation span, per the gen_ai semantic conventions
    # The value vLLM's keyword takes, from the request's; None drops the keyword. Unset: the value.
    to_vllm: Callable[[Any], Any] | None = None

    def problem(self, value: float) -> str | None:
        if self.bound is None or self.bound.holds(value):
            return None
        return f"{self.field} must be within {self.bound}"


PARAMETERS: tuple[SamplingParameter, ...] = (
    SamplingParameter(
        "temperature",
        Bound(0.0, 2.0),
        default=DEFAULT_TEMPERATURE,
        vllm_kwarg="temperature",
        span_attribute="gen_ai.request.temperature",
    ),
    SamplingParameter(
        "top_p", Bound(0.0, 1.0, low_open=True), vllm_kwarg="top_p", span_attribute="gen_ai.request.top_p"
    ),
    # Clamped to the room the prompt leaves (contract.new_tokens_allowed), so the engine computes it.
    SamplingParameter("max_tokens", span_attribute="gen_ai.request.max_tokens"),
    SamplingParameter("seed", vllm_kwarg="seed", span_attribute="gen_ai.request.seed"),
    SamplingParameter(
        "presence_penalty",
        Bound(-2.0, 2.0),
        vllm_kwarg="presence_penalty",
        span_attribute="gen_ai.request.presence_penalty",
    ),
    SamplingParameter(
        "frequency_penalty",
        Bound(-2.0, 2.0),
        vllm_kwarg="frequency_penalty",
        span_attribute="gen_ai.request.frequency_penalty",
    ),
    SamplingParameter("stop", vllm_kwarg="stop", span_attribute="gen_ai.request.stop_sequences"),
    # 0 and -1 both mean "all tokens" to vLLM.
    SamplingParameter(
        "top_k", Bound(-1, INT32_MAX), vllm_kwarg="top_k", span_attribute="gen_ai.request.top_k"
    ),
    SamplingParameter("min_p", Bound(0.0, 1.0), vllm_kwarg="min_p"),
    SamplingParameter("repetition_penalty", Bound(0.0, 2.0, low_open=True), vllm_kwarg="repetition_penalty"),
    # Clamped to the request's max_tokens and reduced by the tokens a resumed run already has: the
    # engine computes it. Its bound against max_tokens is the front door's (validation).
    SamplingParameter("min_tokens"),
    # vLLM's one `logprobs` keyword is the number of alternatives: 0 is the sampled token's alone.
    SamplingParameter("logprobs", vllm_kwarg="logprobs", to_vllm=lambda on: 0 if on else None),
    # After `logprobs`, whose keyword it overrides; the front door refuses it without `logprobs`.
    SamplingParameter("top_logprobs", Bound(0, MAX_TOP_LOGPROBS), vllm_kwarg="logprobs"),
)


def raw_values(sampling: chat_pb2.SamplingParams) -> Iterator[tuple[SamplingParameter, Any]]:
    """Each parameter the request sets, with its value as the proto holds it (a float as float32)."""
    values = {descriptor.name: value for descriptor, value in sampling.ListFields()}
    for parameter in PARAMETERS:
        if parameter.field in values:
            yield parameter, values[parameter.field]


def set_values(sampling: chat_pb2.SamplingParams) -> Iterator[tuple[SamplingParameter, Any]]:
    """Each parameter the request sets, with the value the caller wrote."""
    for parameter, value in raw_values(sampling):
        if isinstance(value, float):
            # A proto float is float32: 0.7 reads back as 0.699999988. The shortest decimal that
            # round-trips through float32 is what the caller wrote.
            value = float(np.format_float_positional(np.float32(value), unique=True, trim="-"))
        elif not isinstance(value, int):
            value = list(value)  # a repeated field
        yield parameter, value


def apply_defaults(sampling: chat_pb2.SamplingParams) -> None:
    """Fill in, in place, the defaults of the parameters left unset."""
    unset = {p.field for p in PARAMETERS} - {p.field for p, _ in raw_values(sampling)}
    for parameter in PARAMETERS:
        if parameter.default is not None and parameter.field in unset:
            setattr(sampling, parameter.field, parameter.default)


def vllm_kwargs(sampling: chat_pb2.SamplingParams) -> dict[str, Any]:
    """The `vllm.SamplingParams` keywords of what the request sets, defaults for what it does not."""
    kwargs: dict[str, Any] = {
        p.vllm_kwarg: p.default for p in PARAMETERS if p.vllm_kwarg is not None and p.default is not None
    }
    for parameter, value in set_values(sampling):
        if parameter.vllm_kwarg is None:
            continue
        if parameter.to_vllm is not None:
            value = parameter.to_vllm(value)
        if value is None:
            kwargs.pop(parameter.vllm_kwarg, None)
        else:
            kwargs[parameter.vllm_kwarg] = value
    return kwargs


def span_attributes(sampling: chat_pb2.SamplingParams) -> dict[str, Any]:
    return {p.span_attribute: value for p, value in set_values(sampling) if p.span_attribute is not None}
