"""The HTTP door's translation of OpenAI bodies into ChatRequests, and of field paths back."""

from __future__ import annotations

import orjson
import pytest

from mistral_serve.frontend.errors import InvalidRequest
from mistral_serve.frontend.openai_http.requests import OpenAINames, parse_body, to_chat_completion
from mistral_serve.frontend.openai_http.responses import ChunkWriter, completion, parse_event_id
from mistral_serve.frontend.request_form import build_request_form
from mistral_serve.v1 import chat_pb2

MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"


def fields(error: pytest.ExceptionInfo[InvalidRequest]) -> list[str]:
    return [v.field for v in error.value.violations]


def test_a_full_body_becomes_the_chat_request_it_describes() -> None:
    parsed = to_chat_completion(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {"type": "image_url", "image_url": {"url": "data:x"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "42"},
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "temperature": 0.5,
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "stop": "END",
            "seed": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logit_bias": {"1": 2},  # unknown here: ignored, as vLLM does
            "user": "someone",
        },
        idempotency_key="retry-1",
    )
    r = parsed.request
    assert [m.role for m in r.messages] == [
        chat_pb2.ROLE_SYSTEM,
        chat_pb2.ROLE_USER,
        chat_pb2.ROLE_ASSISTANT,
        chat_pb2.ROLE_TOOL,
    ]
    assert r.messages[1].content[1].image_url == "data:x"
    assert r.messages[2].tool_calls[0].arguments_json == "{}"
    assert r.messages[3].tool_call_id == "abcDEF123"
    assert r.tools[0].parameters_json_schema == '{"type": "object"}'
    assert r.tool_choice == chat_pb2.ToolChoice(mode=chat_pb2.ToolChoice.MODE_FUNCTION, function_name="f")
    assert r.sampling.max_tokens == 7 and list(r.sampling.stop) == ["END"] and r.sampling.seed == 3
    assert r.client_request_id == "retry-1"
    assert parsed.stream and parsed.include_usage and parsed.model == MODEL
    assert parsed.names.param("sampling.max_tokens") == "max_completion_tokens"
    assert parsed.names.param("sampling.stop[0]") == "stop"


def test_temperature_left_out_gets_the_model_card_s_default() -> None:
    request = to_chat_completion({"messages": [{"role": "user", "content": "hi"}]}).request
    assert not request.sampling.HasField("temperature")
    assert build_request_form(request, {}).request.sampling.temperature == pytest.approx(0.15)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 3}]}]},
            "messages[0].content[0].image_url",
        ),
        ({"n": 3}, "n"),
        ({"temperature": True}, "temperature"),
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"seed": 2**70}, "seed"),
        ({"stop": [1]}, "stop[0]"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_a_field_of_the_wrong_shape_is_named_in_openai_s_naming(body: dict[str, object], where: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        to_chat_completion({"messages": [{"role": "user", "content": "hi"}], **body})
    assert where in fields(refused)


def test_pipeline_paths_are_named_as_the_caller_sent_them() -> None:
    names = OpenAINames(string_content={0})
    assert names.param("messages[0].content[0]") == "messages[0].content"
    assert names.param("messages[1].content[2].image.data") == "messages[1].content[2].image_url"
    assert names.param("messages[1].content[2].image_url") == "messages[1].content[2].image_url"
    assert (
        names.param("messages[2].tool_calls[0].arguments_json")
        == "messages[2].tool_calls[0].function.arguments"
    )
    assert names.param("tools[1].parameters_json_schema") == "tools[1].function.parameters"
    assert names.param("tool_choice.mode") == "tool_choice"
    assert names.param("tool_choice.function_name") == "tool_choice.function.name"
    assert names.param("sampling.top_p") == "top_p"
    assert names.param("sampling.stop[3]") == "stop[3]"
    assert names.param("client_request_id") == "Idempotency-Key"
    assert names.param("last_sequence") == "Last-Event-ID"
    assert names.param("") is None


def test_a_body_that_is_not_strict_json_is_refused_whole() -> None:
    for raw in (b"{", b'{"temperature": NaN}', b'"\\ud800"', b"[" * 2000 + b"]" * 2000):
        with pytest.raises(InvalidRequest) as refused:
            parse_body(raw)
        assert fields(refused) == [""]


def test_event_ids_read_back() -> None:
    assert parse_event_id("abc/12") == ("abc", 12)
    assert parse_event_id("abc") is None
    assert parse_event_id("abc/x") is None
    assert parse_event_id("/3") is None


def test_vllms_extra_sampling_params_and_logprobs_reach_the_chat_request() -> None:
    parsed = to_chat_completion(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "top_k": 40,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 3,
            "logprobs": True,
            "top_logprobs": 5,
            "default_system_prompt": False,
        }
    )
    s = parsed.request.sampling
    assert (s.top_k, s.min_tokens, s.logprobs, s.top_logprobs) == (40, 3, True, 5)
    assert s.min_p == pytest.approx(0.05) and s.repetition_penalty == pytest.approx(1.1)
    assert parsed.request.HasField("default_system_prompt") and not parsed.request.default_system_prompt
    unset = to_chat_completion({"messages": [{"role": "user", "content": "hi"}]}).request
    assert not unset.HasField("default_system_prompt") and not unset.sampling.HasField("top_k")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 1.5),
        ("min_tokens", -1),
        ("logprobs", 1),
        ("top_logprobs", "3"),
        ("min_p", "x"),
        ("default_system_prompt", "no"),
    ],
)
def test_a_new_field_of_the_wrong_type_is_named(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest) as refused:
        to_chat_completion({"messages": [{"role": "user", "content": "hi"}], field: value})
    assert fields(refused) == [field]


def test_logprobs_take_openais_shape_and_the_stop_its_reason() -> None:
    token = chat_pb2.TokenLogprob(
        token_id=7,
        token="é",
        logprob=-0.5,
        top_logprobs=[
            chat_pb2.TopLogprob(token_id=7, token="é", logprob=-0.5),
            chat_pb2.TopLogprob(token_id=9, token="e", logprob=float("-inf")),
        ],
    )
    finished = chat_pb2.Finished(finish_reason=chat_pb2.FINISH_REASON_STOP, stop="END")
    choice = completion("r1", MODEL, 0, "x", finished, [token])["choices"][0]
    assert choice["stop_reason"] == "END"
    assert choice["logprobs"] == {
        "content": [
            {
                "token": "é",
                "logprob": -0.5,
                "bytes": [195, 169],
                "top_logprobs": [
                    {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                    {"token": "e", "logprob": -9999.0, "bytes": [101]},  # JSON has no -Infinity
                ],
            }
        ]
    }
    plain = completion("r1", MODEL, 0, "x", chat_pb2.Finished())["choices"][0]
    assert (plain["logprobs"], plain["stop_reason"]) == (None, None)
    writer = ChunkWriter("r1", MODEL, 0, include_usage=False)
    chunk = orjson.loads(
        writer.delta(chat_pb2.Delta(sequence=1, text="é", logprobs=[token])).split(b"data: ")[1]
    )
    assert chunk["choices"][0]["logprobs"] == choice["logprobs"]
    last = orjson.loads(writer.finished(finished).split(b"data: ")[1].split(b"\n\n")[0])
    assert (last["choices"][0]["finish_reason"], last["choices"][0]["stop_reason"]) == ("stop", "END")
