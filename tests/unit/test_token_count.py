"""The frontend's token count equals the worker's prompt, images counted from their headers alone."""

from __future__ import annotations

import pytest

from mistral_serve.common.prompts import PromptBuilder
from mistral_serve.frontend.errors import InvalidRequest
from mistral_serve.frontend.validation import Limits, check_budget
from mistral_serve.v1 import chat_pb2 as R
from tests.engine.tiny_model import ensure_tiny_model
from tests.integration.front_door_cases import data_url, image, png, req, text, user
from tests.integration.test_front_door import tiny_token_counter

REQUESTS = [
    req(user(text("hello world"))),
    req(
        user(
            text("look"),
            image(png(3000, 200)),
            R.ContentPart(image_url=data_url(png(50, 700, "JPEG"), "image/jpeg")),
        )
    ),
    req(user(image(png(1540, 1540)))),
    req(user(text("odd sizes"), image(png(29, 1)), image(png(1541, 3)))),
]


@pytest.mark.parametrize("request_", REQUESTS)
def test_count_equals_the_built_prompt(request_: R.ChatRequest) -> None:
    built = PromptBuilder.from_model(str(ensure_tiny_model())).build(request_)
    counted = tiny_token_counter()(request_)
    assert (counted.prompt_tokens, counted.image_tokens) == (built.prompt_tokens, built.image_tokens)


def test_a_1540_square_image_is_3080_tokens() -> None:
    assert tiny_token_counter()(REQUESTS[2]).image_tokens == 55 * 55 + 55


def test_budget_names_the_numbers_and_the_largest_max_tokens_that_fits() -> None:
    counted = R.CountTokensResponse(prompt_tokens=1000)
    request = req(user(), sampling=R.SamplingParams(max_tokens=1100))
    with pytest.raises(InvalidRequest) as refused:
        check_budget(counted, request, Limits(context_length=2048), path="")
    violation = refused.value.violations[0]
    assert violation.field == "sampling.max_tokens"
    assert (
        "1000" in violation.description
        and "2100" in violation.description
        and "at most 1048" in violation.description
    )
    check_budget(
        counted, req(user(), sampling=R.SamplingParams(max_tokens=1048)), Limits(context_length=2048), path=""
    )
