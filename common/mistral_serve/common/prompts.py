"""Builds the model's prompt from a `ChatRequest` with `mistral_common`, the model's own chat format.

Shared by the frontend (token counting, before admission) and the worker (the prompt it runs), so both
count the same tokens. vLLM's chat path with `tokenizer_mode=mistral` encodes a conversation with the
same `mistral_common` call (`ChatCompletionRequest` → `MistralTokenizer.encode_chat_completion`), so the
token ids built here are the ones vLLM would build. This module must not import vllm or torch: the
frontend has neither.

Images arrive as `ImageBytes` only (the front door turns data: and fetched URLs into bytes), and the
builder's image loader makes them what `mistral_common` encodes: the worker decodes the pixels, the
frontend's token counter only needs each image's size.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import mistral_common
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import (
    Function,
    FunctionCall,
    FunctionName,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolChoiceEnum,
)
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import ValidationError

from mistral_serve.v1 import chat_pb2

Tokenizer: TypeAlias = MistralTokenizer[Any, Any, Any, Any, Any]
# Turns an image of the request, in prompt order, into the image mistral_common encodes.
ImageLoader: TypeAlias = Callable[[chat_pb2.ImageBytes], Image.Image]

TOKENIZER_FILE = "tekken.json"
SYSTEM_PROMPT_FILE = "SYSTEM_PROMPT.txt"
# How mistral_common and vLLM join the text parts of a SYSTEM, ASSISTANT or TOOL message.
TEXT_PART_SEPARATOR = "\n\n"
# The tokens an image expands to: one per merged patch, a break per row, an end per image.
_IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")


class PromptError(ValueError):
    """The conversation cannot be turned into a prompt: the caller's fault (INVALID_ARGUMENT)."""


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    token_ids: list[int]
    # Decoded RGB images in prompt order; the engine passes them beside the token ids.
    images: list[Image.Image] = field(default_factory=list)
    # Part of `token_ids` that images take.
    image_tokens: int = 0
    # The mistral_common request the prompt was encoded from (the worker's grammar reads its tools).
    request: ChatCompletionRequest[Any] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)


def resolve_model_file(model: str, filename: str) -> Path | None:
    """Path of `filename` in the model: a local folder, or a hub id read through the local HF cache.

    With `HF_HUB_OFFLINE=1` a hub id resolves only from files already cached. None when the model
    has no such file.
    """
    local = Path(model)
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=model, filename=filename))
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        # Offline and not cached: a missing optional file must not stop the service.
        if filename == TOKENIZER_FILE:
            raise
        return None


def prompt_fingerprint(tokenizer_file: Path, *, model_name: str, system_prompt_template: str | None) -> str:
    """Names the prompts a builder makes: two builders with the same fingerprint (the same tokenizer
    file, default system prompt, model name and mistral_common) build the same ids for a request."""
    digest = hashlib.sha256(tokenizer_file.read_bytes())
    for part in (system_prompt_template or "", model_name, mistral_common.__version__):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:32]


def fill_system_prompt(template: str, *, model_name: str, today: dt.date) -> str:
    """Fill the model card's placeholders; `str.format` would choke on other braces in the text."""
    yesterday = today - dt.timedelta(days=1)
    return (
        template.replace("{name}", model_name)
        .replace("{today}", today.strftime("%Y-%m-%d"))
        .replace("{yesterday}", yesterday.strftime("%Y-%m-%d"))
    )


def decode_image(data: bytes) -> Image.Image:
    """Decode an encoded image to RGB, transparent areas over white (as vLLM and mistral_common do)."""
    try:
        opened = Image.open(io.BytesIO(data))
        opened.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PromptError(f"image cannot be decoded: {exc}") from exc
    image = upright(opened)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """The image as it is shown: its EXIF orientation applied, as vLLM's image loader does first."""
    with contextlib.suppress(Exception):  # a broken EXIF block leaves the pixels as stored, as in vLLM
        image = ImageOps.exif_transpose(image)
    return image


def decode_image_bytes(image: chat_pb2.ImageBytes) -> Image.Image:
    """The default image loader: the pixels, as the engine needs them."""
    return decode_image(image.data)


class PromptBuilder:
    """Turns `ChatRequest`s into token ids and images for one model's tokenizer."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        system_prompt_template: str | None = None,
        image_loader: ImageLoader = decode_image_bytes,
        fingerprint: str = "",
    ) -> None:
        self._tokenizer = tokenizer
        # `prompt_fingerprint` of the files this builder was made from; "" takes no ids built elsewhere.
        self.fingerprint = fingerprint
        self._model_name = model_name
        self._system_prompt_template = system_prompt_template
        self._image_loader = image_loader
        inner = tokenizer.instruct_tokenizer.tokenizer
        self.supports_images: bool = getattr(inner, "image", None) is not None
        self._image_token_ids: frozenset[int] = (
            frozenset(inner.get_special_token(t) for t in _IMAGE_TOKENS)
            if self.supports_images
            else frozenset()
        )

    @classmethod
    def from_model(cls, model: str) -> PromptBuilder:
        """Load the tokenizer and the default system prompt from a model folder or hub id."""
        tokenizer_path = resolve_model_file(model, TOKENIZER_FILE)
        if tokenizer_path is None:
            raise FileNotFoundError(f"{model} has no {TOKENIZER_FILE}")
        # Test mode is what vLLM uses for its mistral tokenizer; serving mode would refuse some
        # conversations vLLM accepts (e.g. an assistant prefix), and we want the same prompts.
        tokenizer = MistralTokenizer.from_file(str(tokenizer_path), mode=ValidationMode.test)
        system_path = resolve_model_file(model, SYSTEM_PROMPT_FILE)
        template = system_path.read_text(encoding="utf-8") if system_path is not None else None
        model_name = os.path.basename(model.rstrip("/"))
        fingerprint = prompt_fingerprint(
            tokenizer_path, model_name=model_name, system_prompt_template=template
        )
        return cls(tokenizer, model_name=model_name, system_prompt_template=template, fingerprint=fingerprint)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def default_system_prompt(self, today: dt.date | None = None) -> str | None:
        if self._system_prompt_template is None:
            return None
        return fill_system_prompt(
            self._system_prompt_template, model_name=self._model_name, today=today or dt.date.today()
        )

    def build(
        self,
        chat: chat_pb2.ChatRequest,
        *,
        today: dt.date | None = None,
        known_ids: Sequence[int] = (),
        known_by: str = "",
    ) -> BuiltPrompt:
        """Token ids (and images) of the prompt; raises PromptError on a conversation the model refuses.

        `known_ids` are the prompt's ids as a builder with fingerprint `known_by` encoded them (the
        front door's count): with this builder's fingerprint and no image, they are the prompt, and
        the conversation is not encoded again.
        """
        request, images = self.to_mistral_request(chat, today=today)
        if known_ids and self.fingerprint and known_by == self.fingerprint and not images:
            return BuiltPrompt(token_ids=list(known_ids), request=request)
        try:
            tokenized = self._tokenizer.encode_chat_completion(request)
        except (MistralCommonException, AssertionError, ValidationError, ValueError, KeyError) as exc:
            # mistral_common reports bad conversations with asserts and its own exceptions alike.
            raise PromptError(f"invalid conversation: {exc}") from exc
        tokens: list[int] = list(tokenized.tokens)
        image_tokens = sum(1 for t in tokens if t in self._image_token_ids)
        return BuiltPrompt(token_ids=tokens, images=images, image_tokens=image_tokens, request=request)

    def to_mistral_request(
        self,
        chat: chat_pb2.ChatRequest,
        *,
        today: dt.date | None = None,
        image_loader: ImageLoader | None = None,
    ) -> tuple[ChatCompletionRequest[Any], list[Image.Image]]:
        """The `mistral_common` request for `chat`, with the images it carries, in order.

        `image_loader` replaces the builder's own for this request (the counter's sizes of it).
        """
        if not chat.messages:
            raise PromptError("messages must not be empty")
        load = image_loader or self._image_loader
        images: list[Image.Image] = []
        messages: list[Any] = []
        # The front door fills the field in from its setting; unset here (a test, a bench) is on.
        wanted = chat.default_system_prompt if chat.HasField("default_system_prompt") else True
        has_system = any(m.role == chat_pb2.ROLE_SYSTEM for m in chat.messages)
        default_system = None if has_system or not wanted else self.default_system_prompt(today)
        if default_system:
            messages.append(SystemMessage(content=default_system))
        for index, message in enumerate(chat.messages):
            messages.append(self._message(index, message, images, load))
        if images and not self.supports_images:
            raise PromptError("this model does not accept images")
        tools = [_tool(t) for t in chat.tools] or None
        try:
            request = ChatCompletionRequest(
                messages=messages,
                tools=tools,
                tool_choice=_tool_choice(chat.tool_choice),
            )
        except (ValidationError, ValueError) as exc:
            raise PromptError(f"invalid request: {exc}") from exc
        return request, images

    def _message(
        self, index: int, message: chat_pb2.Message, images: list[Image.Image], load: ImageLoader
    ) -> Any:
        where = f"messages[{index}]"
        try:
            if message.role == chat_pb2.ROLE_SYSTEM:
                return SystemMessage(content=_text_only(message.content, where))
            if message.role == chat_pb2.ROLE_USER:
                return UserMessage(content=_user_content(message.content, images, where, load))
            if message.role == chat_pb2.ROLE_ASSISTANT:
                text = _text_only(message.content, where) if message.content else None
                calls = [
                    ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments_json or "{}"))
                    for c in message.tool_calls
                ]
                return AssistantMessage(content=text, tool_calls=calls or None, prefix=message.prefix)
            if message.role == chat_pb2.ROLE_TOOL:
                if not message.tool_call_id:
                    raise PromptError(f"{where}: a tool message needs tool_call_id")
                return ToolMessage(
                    content=_text_only(message.content, where), tool_call_id=message.tool_call_id
                )
        except ValidationError as exc:
            raise PromptError(f"{where}: {exc}") from exc
        raise PromptError(f"{where}: role must be set")


def _user_content(
    parts: Sequence[chat_pb2.ContentPart], images: list[Image.Image], where: str, load: ImageLoader
) -> str | list[Any]:
    # One text part stays a plain string, as an OpenAI-style string content does in vLLM's path:
    # mistral_common encodes a list of chunks chunk by chunk, which can tokenize differently.
    if len(parts) == 1 and parts[0].WhichOneof("kind") == "text":
        return parts[0].text
    chunks: list[Any] = []
    for i, part in enumerate(parts):
        kind = part.WhichOneof("kind")
        if kind == "text":
            chunks.append(TextChunk(text=part.text))
        elif kind == "image":
            image = load(part.image)
            images.append(image)
            chunks.append(ImageChunk(image=image))
        elif kind == "image_url":
            # The front door fetched or decoded it: a queued request carries images as bytes.
            raise PromptError(f"{where}.content[{i}]: image URLs are resolved at the front door, not here")
        else:
            raise PromptError(f"{where}.content[{i}] is empty")
    if not chunks:
        raise PromptError(f"{where}: a user message needs content")
    return chunks


def _text_only(parts: Sequence[chat_pb2.ContentPart], where: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        if part.WhichOneof("kind") != "text":
            raise PromptError(f"{where}.content[{i}]: only user messages may hold images")
        texts.append(part.text)
    return TEXT_PART_SEPARATOR.join(texts)


def _tool(tool: chat_pb2.Tool) -> Any:
    try:
        parameters = json.loads(tool.parameters_json_schema) if tool.parameters_json_schema else {}
    except json.JSONDecodeError as exc:
        raise PromptError(f"tool {tool.name!r}: parameters_json_schema is not JSON: {exc}") from exc
    if not isinstance(parameters, dict):
        raise PromptError(f"tool {tool.name!r}: parameters_json_schema must be a JSON object")
    try:
        return Tool(function=Function(name=tool.name, description=tool.description, parameters=parameters))
    except ValidationError as exc:
        raise PromptError(f"tool {tool.name!r}: {exc}") from exc


def _tool_choice(choice: chat_pb2.ToolChoice) -> Any:
    mode = choice.mode
    if mode == chat_pb2.ToolChoice.MODE_NONE:
        return ToolChoiceEnum.none
    if mode == chat_pb2.ToolChoice.MODE_ANY:
        return ToolChoiceEnum.any
    if mode == chat_pb2.ToolChoice.MODE_FUNCTION:
        if not choice.function_name:
            raise PromptError("tool_choice FUNCTION needs function_name")
        return NamedToolChoice(function=FunctionName(name=choice.function_name))
    return ToolChoiceEnum.auto
