"""The rules frontend and worker share (`common.contract`, `common.sampling`): one home each, and the
parts that read them agree."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.exceptions import RedisError

from mistral_serve.common import retry, sampling
from mistral_serve.common.contract import (
    FINISH_REASONS,
    code_name,
    error_event,
    finish_reason_name,
    model_tool_call_id,
)
from mistral_serve.common.settings import SharedSettings, served_name
from mistral_serve.frontend.errors import InvalidRequest
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.frontend.validation import validate_chat_request
from mistral_serve.v1 import chat_pb2 as R
from mistral_serve.worker.settings import WorkerSettings
from mistral_serve.worker.tool_calls import ToolCallStreamParser
from tests.integration.front_door_cases import assistant, call, req, result, user
from tests.integration.test_front_door import form_of
from tests.support.scripted_engine import marks


def test_openai_style_call_ids_are_their_last_nine_characters() -> None:
    assert model_tool_call_id("call_7fQx2LmN0aBcDeFgHi") == "aBcDeFgHi"
    assert model_tool_call_id("abcDEF123") == "abcDEF123"
    form = form_of(
        req(user(), assistant("", call("call_7fQx2LmN0aBcDeFgHi")), result("call_7fQx2LmN0aBcDeFgHi"))
    )
    assert form.request.messages[1].tool_calls[0].id == "aBcDeFgHi"
    assert form.request.messages[2].tool_call_id == "aBcDeFgHi"


def parsed_calls(output: str) -> tuple[str, list[R.FunctionCall]]:
    parser = ToolCallStreamParser(call_id_seed="r1")
    text, _ = parser.feed(output, marks(output))  # its marker names as the special tokens
    tail, calls = parser.finish()
    return text + tail, calls


def test_a_call_the_parser_emits_is_one_the_front_door_accepts_back() -> None:
    _, calls = parsed_calls('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}')
    validate_chat_request(req(user(), assistant("", *calls), result(calls[0].id)))  # raises if not


def test_a_name_the_front_door_refuses_is_text_not_a_call() -> None:
    output = '[TOOL_CALLS]math.sqrt[ARGS]{"x": 1}'
    assert parsed_calls(output) == (output, [])
    with pytest.raises(InvalidRequest):
        validate_chat_request(req(user(), assistant("", call(name="math.sqrt")), result()))


def test_the_sampling_table_drives_validation_vllm_and_spans() -> None:
    params = R.SamplingParams(temperature=0.7, top_p=0.9, seed=7, stop=["END"], max_tokens=5)
    assert sampling.vllm_kwargs(params) == {"temperature": 0.7, "top_p": 0.9, "seed": 7, "stop": ["END"]}
    assert sampling.span_attributes(params) == {
        "gen_ai.request.temperature": 0.7,  # not 0.699999988: the float32 the proto holds
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.max_tokens": 5,
        "gen_ai.request.seed": 7,
        "gen_ai.request.stop_sequences": ["END"],
    }
    assert sampling.vllm_kwargs(R.SamplingParams()) == {"temperature": sampling.DEFAULT_TEMPERATURE}
    for parameter in sampling.PARAMETERS:
        if parameter.bound is None:
            continue
        field = R.SamplingParams.DESCRIPTOR.fields_by_name[parameter.field]
        unsigned = field.type in (field.TYPE_UINT32, field.TYPE_UINT64)
        outside = parameter.bound.high + 1 if unsigned else parameter.bound.low - 1
        value = float(outside) if field.type == field.TYPE_FLOAT else int(outside)
        # top_logprobs comes with logprobs (its pair rule is tested on its own).
        params = R.SamplingParams(**{parameter.field: value}, logprobs=True)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest) as refused:
            validate_chat_request(req(user(), sampling=params))
        assert [v.field for v in refused.value.violations] == [f"sampling.{parameter.field}"]


def test_new_sampling_rows_reach_vllm_under_its_keywords() -> None:
    params = R.SamplingParams(top_k=40, min_p=0.05, repetition_penalty=1.1, min_tokens=3)
    assert sampling.vllm_kwargs(params) == {
        "temperature": sampling.DEFAULT_TEMPERATURE,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
    }  # min_tokens: the engine's, clamped (vllm_engine.sampling_params)
    assert sampling.span_attributes(params) == {"gen_ai.request.top_k": 40}


@pytest.mark.parametrize(
    ("logprobs", "top", "keyword"), [(False, None, None), (True, None, 0), (True, 5, 5), (True, 0, 0)]
)
def test_logprobs_and_top_logprobs_are_vllms_one_logprobs_keyword(
    logprobs: bool, top: int | None, keyword: int | None
) -> None:
    params = R.SamplingParams(logprobs=logprobs, top_logprobs=top)
    assert sampling.vllm_kwargs(params).get("logprobs") == keyword


def test_every_sampling_field_of_the_proto_has_its_row() -> None:
    assert {f.name for f in R.SamplingParams.DESCRIPTOR.fields} == {p.field for p in sampling.PARAMETERS}


def test_finish_reasons_codes_and_error_events_have_one_spelling() -> None:
    assert {finish_reason_name(v) for v in FINISH_REASONS.values()} == set(FINISH_REASONS)
    assert finish_reason_name(R.FINISH_REASON_UNSPECIFIED) == "unknown"
    assert code_name(14) == "UNAVAILABLE" and code_name(999) == "999"
    event = error_event(14, "gone", retryable=True)
    assert (event.error.code, event.error.message, event.error.retryable) == (14, "gone", True)


def test_both_processes_read_the_shared_settings_from_the_same_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MISTRAL_SERVE_MODEL", "/models/mistral-small")
    monkeypatch.setenv("MISTRAL_SERVE_MAX_MODEL_LEN", "4096")
    monkeypatch.setenv("MISTRAL_SERVE_POOL", "p1")
    frontend, worker = FrontendSettings.from_env(), WorkerSettings.from_env()
    shared = set(SharedSettings.__dataclass_fields__) - {"metrics_port", "drain_grace_s"}
    assert {f: getattr(frontend, f) for f in shared} == {f: getattr(worker, f) for f in shared}
    assert (frontend.context_length, frontend.pool) == (4096, "p1")
    assert (frontend.metrics_port, worker.metrics_port) == (9090, 9091)  # each process's own default
    assert frontend.served_model_name == worker.served_model_name == "mistral-small"


def test_the_served_name_is_never_a_local_path() -> None:
    assert served_name("mistralai/Mistral-Small-3.2-24B-Instruct-2506", None).startswith("mistralai/")
    assert served_name("/work/.cache/tiny-model/", None) == "tiny-model"
    assert served_name("/work/.cache/tiny-model", "tiny") == "tiny"


async def test_redis_work_is_retried_with_a_growing_capped_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def no_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    failures = iter([RedisError("down")] * 8)

    async def op() -> str:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return "done"

    backoff = retry.Backoff(initial_s=0.05, cap_s=2.0)
    assert await retry.until_done(op, log=logging.getLogger("test"), what="op", backoff=backoff) == "done"
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert backoff.delay_s == 0.05  # a success starts short again
