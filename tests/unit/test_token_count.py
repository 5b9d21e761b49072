"""The frontend's token count equals the worker's prompt, images counted from their headers alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from mistral_serve.common.contract import new_tokens_allowed
from mistral_serve.common.prompts import PromptBuilder
from mistral_serve.frontend.errors import InvalidRequest
from mistral_serve.frontend.images import read_header
from mistral_serve.frontend.request_form import FrontDoorRequest, build_request_form
from mistral_serve.frontend.validation import Limits, check_budget
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2 as R
from tests.engine.conversations import make_sideways_jpeg
from tests.engine.tiny_model import ensure_tiny_model
from tests.integration.front_door_cases import data_url, image, png, req, text, user
from tests.integration.test_front_door import form_of, tiny_token_counter

LIMITS = Limits(context_length=2048)
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
    # Stored 112x28 with EXIF orientation 6: counted as shown, 28x112, as the worker decodes it.
    req(user(text("sideways"), image(make_sideways_jpeg(112, 28), "image/jpeg"))),
    req(user(text("no system prompt")), default_system_prompt=False),
]


@pytest.mark.parametrize("request_", REQUESTS)
def test_count_equals_the_built_prompt(request_: R.ChatRequest) -> None:
    form = form_of(request_)
    built = PromptBuilder.from_model(str(ensure_tiny_model())).build(form.request)
    counted = tiny_token_counter()(form)
    assert (counted.prompt_tokens, counted.image_tokens) == (built.prompt_tokens, built.image_tokens)


def test_a_1540_square_image_is_3080_tokens() -> None:
    assert tiny_token_counter()(form_of(REQUESTS[2])).image_tokens == 55 * 55 + 55


def test_images_are_counted_from_the_size_the_front_door_read_never_from_their_bytes() -> None:
    queued = queue_pb2.QueuedRequest(request=req(user(image(b"no image bytes at all"))))
    counted = tiny_token_counter()(FrontDoorRequest(queued, image_sizes=[(1540, 1540)]))
    assert counted.image_tokens == 55 * 55 + 55


def test_max_tokens_over_the_room_left_is_clamped_not_refused() -> None:
    counted = R.CountTokensResponse(prompt_tokens=10)
    for max_tokens in (1100, 2038, 2048):
        check_budget(counted, req(user(), sampling=R.SamplingParams(max_tokens=max_tokens)), LIMITS, path="")
    assert new_tokens_allowed(10, 2048, 2048) == 2038
    assert new_tokens_allowed(10, 100, 2048) == 100
    assert new_tokens_allowed(10, None, 2048) == 2038


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "field", "counts"),
    [
        (2048, 10, "messages", ("2048 tokens", "no room")),  # the prompt leaves no room
        (10, 2049, "sampling.max_tokens", ("2049", "2048")),  # max_tokens alone over the context
    ],
)
def test_a_request_that_cannot_fit_is_refused_with_the_counts(
    prompt: int, max_tokens: int, field: str, counts: tuple[str, str]
) -> None:
    counted = R.CountTokensResponse(prompt_tokens=prompt)
    request = req(user(), sampling=R.SamplingParams(max_tokens=max_tokens))
    with pytest.raises(InvalidRequest) as refused:
        check_budget(counted, request, LIMITS, path="request.")
    (violation,) = refused.value.violations
    assert violation.field == f"request.{field}"
    assert all(count in violation.description for count in counts), violation.description


def test_the_header_size_of_an_exif_rotated_jpeg_is_as_shown() -> None:
    assert read_header(make_sideways_jpeg(112, 28)) == (28, 112)
    assert read_header(png(112, 28, "JPEG")) == (112, 28)


@pytest.mark.parametrize(
    ("setting", "sent", "queued"), [(True, None, True), (False, None, False), (False, True, True)]
)
def test_the_request_form_decides_the_default_system_prompt_once(
    setting: bool, sent: bool | None, queued: bool
) -> None:
    request = req(user(text("hi")), default_system_prompt=sent)
    form = build_request_form(request, {}, default_system_prompt=setting)
    assert form.request.default_system_prompt is queued


def test_the_front_doors_ids_are_the_workers_prompt_and_named_by_the_same_fingerprint() -> None:
    counter, builder = tiny_token_counter(), PromptBuilder.from_model(str(ensure_tiny_model()))
    assert counter.fingerprint == builder.fingerprint != ""
    form = form_of(REQUESTS[0])
    assert counter.encode(form) == builder.build(form.request).token_ids


def test_a_worker_runs_the_front_doors_ids_only_when_its_fingerprint_is_theirs() -> None:
    builder = PromptBuilder.from_model(str(ensure_tiny_model()))
    request = REQUESTS[0]
    sent = [7, 7, 7]  # not the conversation's ids: seen in the prompt only if they were used
    assert builder.build(request, known_ids=sent, known_by=builder.fingerprint).token_ids == sent
    encoded = builder.build(request).token_ids
    assert builder.build(request, known_ids=sent, known_by="another tokenizer").token_ids == encoded
    assert builder.build(request, known_ids=[], known_by=builder.fingerprint).token_ids == encoded
    # Images are decoded by the worker, so their prompts are always built again.
    with_image = REQUESTS[3]
    built = builder.build(with_image, known_ids=sent, known_by=builder.fingerprint)
    assert built.token_ids != sent and built.image_tokens > 0


def test_a_different_default_system_prompt_is_a_different_fingerprint(tmp_path: Path) -> None:
    model = ensure_tiny_model()
    other = tmp_path / model.name
    other.mkdir()
    (other / "tekken.json").write_bytes((model / "tekken.json").read_bytes())
    (other / "SYSTEM_PROMPT.txt").write_text("You are another assistant.")
    assert (
        PromptBuilder.from_model(str(other)).fingerprint != PromptBuilder.from_model(str(model)).fingerprint
    )


def test_small_text_requests_are_counted_on_the_loop_large_or_image_ones_on_a_thread() -> None:
    counter = tiny_token_counter()
    assert counter.cheap(form_of(REQUESTS[0]))
    assert not counter.cheap(form_of(req(user(text("word " * 2000)))))
    assert not counter.cheap(form_of(REQUESTS[3]))
