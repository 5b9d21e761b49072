"""Prompt building with mistral_common on the tiny model's v11 tokenizer (no vLLM, no torch)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from PIL import ImageOps

from mistral_serve.common.prompts import PromptBuilder, PromptError, decode_image, fill_system_prompt
from mistral_serve.v1 import chat_pb2 as pb
from tests.engine.conversations import (
    all_conversations,
    data_url,
    make_png,
    make_sideways_jpeg,
    text,
    with_images_as,
)
from tests.engine.tiny_model import ensure_tiny_model

TODAY = dt.date(2026, 3, 1)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def builder(model_dir: Path) -> PromptBuilder:
    return PromptBuilder.from_model(str(model_dir))


def user(*parts: pb.ContentPart) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=list(parts))


def openai_encoding(
    builder: PromptBuilder, messages: list[dict[str, Any]], tools: Any = None, *, continue_final: bool = False
) -> list[int]:
    """The encoding vLLM's mistral chat path performs (transformers' MistralCommonBackend does this)."""
    request = ChatCompletionRequest.from_openai(
        messages=messages, tools=tools, continue_final_message=continue_final
    )
    return list(builder.tokenizer.encode_chat_completion(request).tokens)


def decode_keep_special(builder: PromptBuilder, token_ids: list[int]) -> str:
    inner = builder.tokenizer.instruct_tokenizer.tokenizer
    return str(inner.decode(token_ids, special_token_policy=SpecialTokenPolicy.KEEP))


def with_upright_images(messages: list[dict[str, Any]]) -> list[Any]:
    """mistral_common's own `from_openai` counts an image as stored; vLLM's loader turns it first."""
    return with_images_as(messages, ImageOps.exif_transpose)


@pytest.mark.parametrize("conversation", all_conversations(), ids=lambda c: c.name)
def test_prompt_equals_the_openai_style_encoding_of_the_same_conversation(
    builder: PromptBuilder, conversation: Any
) -> None:
    assert builder.build(conversation.chat).token_ids == openai_encoding(
        builder,
        with_upright_images(conversation.openai_messages),
        conversation.openai_tools,
        continue_final=conversation.continue_final_message,
    )


def test_default_system_prompt_comes_from_the_model_folder_with_dates_filled(builder: PromptBuilder) -> None:
    chat = pb.ChatRequest(messages=[user(text("Hi"))])
    built = builder.build(chat, today=TODAY)
    decoded = builder.tokenizer.decode(built.token_ids)
    assert "Today is 2026-03-01; yesterday was 2026-02-28." in decoded
    assert "You are tiny-model," in decoded
    expected = openai_encoding(
        builder,
        [
            {"role": "system", "content": builder.default_system_prompt(TODAY)},
            {"role": "user", "content": "Hi"},
        ],
    )
    assert built.token_ids == expected


def test_a_requests_own_system_message_replaces_the_default(builder: PromptBuilder) -> None:
    chat = pb.ChatRequest(
        messages=[pb.Message(role=pb.ROLE_SYSTEM, content=[text("Mine.")]), user(text("Hi"))]
    )
    built = builder.build(chat, today=TODAY)
    assert "tiny random test model" not in builder.tokenizer.decode(built.token_ids)
    assert built.token_ids == openai_encoding(
        builder, [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}]
    )


def test_no_system_prompt_file_means_no_default(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "tekken.json").symlink_to(model_dir / "tekken.json")
    plain = PromptBuilder.from_model(str(tmp_path))
    built = plain.build(pb.ChatRequest(messages=[user(text("Hi"))]))
    assert built.token_ids == openai_encoding(plain, [{"role": "user", "content": "Hi"}])


def test_system_prompt_placeholders_leave_other_braces_alone() -> None:
    filled = fill_system_prompt("{name} on {today} (was {yesterday}) {other} {}", model_name="m", today=TODAY)
    assert filled == "m on 2026-03-01 (was 2026-02-28) {other} {}"


def test_an_image_is_decoded_to_rgb_pixels_and_its_tokens_counted(builder: PromptBuilder) -> None:
    png = make_png()
    built = builder.build(
        pb.ChatRequest(
            messages=[user(text("x"), pb.ContentPart(image=pb.ImageBytes(data=png, mime_type="image/png")))]
        )
    )
    # 84x56 px at 28 px per token: 2 rows of 3 [IMG] and a row end ([IMG_BREAK], last [IMG_END]).
    assert built.image_tokens == 8
    assert len(built.images) == 1 and built.images[0].size == (84, 56)
    assert built.images[0].mode == "RGB"


def test_the_image_loader_decides_what_mistral_common_sees(builder: PromptBuilder) -> None:
    from PIL import Image

    seen: list[bytes] = []

    def load(image: pb.ImageBytes) -> Image.Image:
        seen.append(image.data)
        return Image.new("RGB", (84, 56))

    chat = pb.ChatRequest(messages=[user(text("x"), pb.ContentPart(image=pb.ImageBytes(data=b"opaque")))])
    built = PromptBuilder(builder.tokenizer, model_name="m", image_loader=load).build(chat)
    assert seen == [b"opaque"] and built.image_tokens == 8


def test_transparent_images_are_flattened_to_rgb(builder: PromptBuilder) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(buf, format="PNG")
    built = builder.build(
        pb.ChatRequest(messages=[user(pb.ContentPart(image=pb.ImageBytes(data=buf.getvalue())))])
    )
    assert built.images[0].mode == "RGB"
    assert built.images[0].getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "part",
    [
        pb.ContentPart(image=pb.ImageBytes(data=b"not an image", mime_type="image/png")),
        pb.ContentPart(image_url="https://example.com/cat.png"),
        pb.ContentPart(image_url=data_url(make_png())),  # the front door turns these into bytes
        pb.ContentPart(),
    ],
    ids=["bad-bytes", "remote-url", "data-url", "empty-part"],
)
def test_bad_image_parts_are_the_callers_fault(builder: PromptBuilder, part: pb.ContentPart) -> None:
    with pytest.raises(PromptError):
        builder.build(pb.ChatRequest(messages=[user(text("look"), part)]))


def test_tool_results_carry_their_nine_character_call_ids(builder: PromptBuilder) -> None:
    conversation = next(c for c in all_conversations() if c.name == "tools")
    decoded = decode_keep_special(builder, builder.build(conversation.chat).token_ids)
    assert "[TOOL_CALLS]get_weather[CALL_ID]aB3dE5gH9[ARGS]" in decoded
    assert "[TOOL_RESULTS]aB3dE5gH9[TOOL_CONTENT]" in decoded
    assert "[AVAILABLE_TOOLS]" in decoded


def test_a_tool_call_id_not_in_the_models_format_is_refused(builder: PromptBuilder) -> None:
    chat = pb.ChatRequest(
        messages=[
            user(text("Weather?")),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.FunctionCall(id="call_1", name="f", arguments_json="{}")],
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content=[text("{}")]),
        ],
        tools=[pb.Tool(name="f", parameters_json_schema='{"type": "object", "properties": {}}')],
    )
    with pytest.raises(PromptError):
        builder.build(chat)


def test_assistant_prefix_is_continued_not_closed(builder: PromptBuilder) -> None:
    def build(prefix: bool) -> list[int]:
        return builder.build(
            pb.ChatRequest(
                messages=[
                    user(text("Count.")),
                    pb.Message(role=pb.ROLE_ASSISTANT, content=[text("One, two,")], prefix=prefix),
                ]
            )
        ).token_ids

    eos = builder.tokenizer.instruct_tokenizer.tokenizer.eos_id
    continued = build(True)
    assert continued[-1] != eos
    assert builder.tokenizer.decode(continued).endswith("One, two,")
    with pytest.raises(PromptError):
        build(False)  # a closed assistant turn cannot end the prompt


@pytest.mark.parametrize(
    ("chat", "match"),
    [
        (pb.ChatRequest(), "empty"),
        (pb.ChatRequest(messages=[pb.Message(content=[text("x")])]), "role"),
        (pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_TOOL, content=[text("x")])]), "tool_call_id"),
        (
            pb.ChatRequest(
                messages=[pb.Message(role=pb.ROLE_SYSTEM, content=[pb.ContentPart(image_url="data:,")])]
            ),
            "only user messages",
        ),
        (
            pb.ChatRequest(
                messages=[user(text("x"))], tools=[pb.Tool(name="f", parameters_json_schema="{oops")]
            ),
            "not JSON",
        ),
        (
            pb.ChatRequest(
                messages=[user(text("x"))], tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_FUNCTION)
            ),
            "function_name",
        ),
    ],
    ids=["no-messages", "no-role", "tool-without-id", "image-in-system", "bad-schema", "named-without-name"],
)
def test_invalid_requests_raise_prompt_error(
    builder: PromptBuilder, chat: pb.ChatRequest, match: str
) -> None:
    with pytest.raises(PromptError, match=match):
        builder.build(chat)


@pytest.mark.parametrize("mode", [pb.ToolChoice.MODE_AUTO, pb.ToolChoice.MODE_NONE, pb.ToolChoice.MODE_ANY])
def test_tool_choice_modes_are_accepted(builder: PromptBuilder, mode: int) -> None:
    chat = pb.ChatRequest(
        messages=[user(text("x"))],
        tools=[
            pb.Tool(name="f", description="d", parameters_json_schema='{"type": "object", "properties": {}}')
        ],
        tool_choice=pb.ToolChoice(mode=mode),  # type: ignore[arg-type]
    )
    assert builder.build(chat).token_ids


def test_text_only_tokenizer_refuses_images(tmp_path: Path) -> None:
    text_only = PromptBuilder.from_model(str(ensure_tiny_model(text_only=True)))
    part = pb.ContentPart(image=pb.ImageBytes(data=make_png(), mime_type="image/png"))
    with pytest.raises(PromptError, match="images"):
        text_only.build(pb.ChatRequest(messages=[user(text("x"), part)]))


def test_an_exif_rotated_jpeg_is_decoded_as_shown() -> None:
    assert decode_image(make_sideways_jpeg(112, 28)).size == (28, 112)


def test_text_parts_of_system_assistant_and_tool_messages_join_with_a_blank_line(
    builder: PromptBuilder,
) -> None:
    def two_parts(role: pb.Role.ValueType, **fields: Any) -> pb.Message:
        return pb.Message(role=role, content=[text("A."), text("B.")], **fields)

    call = pb.FunctionCall(id="aB3dE5gH9", name="f", arguments_json="{}")
    chat = pb.ChatRequest(
        messages=[
            two_parts(pb.ROLE_SYSTEM),
            user(text("go")),
            pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
            two_parts(pb.ROLE_TOOL, tool_call_id="aB3dE5gH9"),
            two_parts(pb.ROLE_ASSISTANT),
            user(text("ok")),
        ],
        tools=[pb.Tool(name="f", parameters_json_schema='{"type": "object"}')],
    )
    decoded = builder.tokenizer.decode(builder.build(chat).token_ids)
    assert decoded.count("A.\n\nB.") == 3, decoded


@pytest.mark.parametrize("switch", [False, True])
def test_a_request_switches_the_default_system_prompt(builder: PromptBuilder, switch: bool) -> None:
    chat = pb.ChatRequest(messages=[user(text("Hi"))], default_system_prompt=switch)
    decoded = builder.tokenizer.decode(builder.build(chat, today=TODAY).token_ids)
    assert ("You are tiny-model," in decoded) is switch
