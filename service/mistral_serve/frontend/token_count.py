"""Prompt tokens of a ChatRequest, counted before admission exactly as the worker's prompt builds.

The conversation goes through the shared `PromptBuilder` and `mistral_common`'s
`encode_chat_completion` (its validator included), so text tokens, the default system prompt and
the chat template are the worker's. Images are never decoded: the builder is handed a 1x1 stand-in,
and the counting tokenizer's image encoder turns the real image's header dimensions into tokens with
`mistral_common`'s own `ImageEncoder._image_to_num_tokens` (patch 14, spatial merge 2, longest side
1540 for this model: one [IMG] per merged patch, an [IMG_BREAK] per row, [IMG_END] last).
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from mistral_common.protocol.instruct.chunk import ImageChunk
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.image import ImageEncoder, ImageEncoding
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from mistral_serve.common.prompts import SYSTEM_PROMPT_FILE, PromptBuilder, PromptError
from mistral_serve.v1 import chat_pb2

from .errors import FieldViolation, InvalidRequest
from .images import FORMATS, ImageLimits, ImageProblem, parse_data_url, sniff_format


def _stand_in_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, format="PNG")
    return out.getvalue()


_STAND_IN = _stand_in_png()
# Validation has bounded the images already; counting re-reads data URLs without bounds.
_NO_LIMIT = ImageLimits(max_bytes=1 << 62, max_side_px=1 << 30, max_pixels=1 << 62)


class _HeaderOnlyImageEncoder(ImageEncoder):
    """mistral_common's image token rule, applied to the image's size alone."""

    def __call__(self, content: Any) -> ImageEncoding:
        w, h = self._image_to_num_tokens(content.image)
        tokens = ([self.special_ids.img] * w + [self.special_ids.img_break]) * h
        tokens[-1] = self.special_ids.img_end
        return ImageEncoding(tokens=tokens, image=np.zeros((3, 1, 1), dtype=np.float32))


class TokenCounter:
    """`ChatRequest -> CountTokensResponse`; raises InvalidRequest for a conversation the model refuses."""

    def __init__(self, builder: PromptBuilder) -> None:
        self._builder = builder
        self._tokenizer = _counting_tokenizer(builder.tokenizer)
        encoder = builder.tokenizer.instruct_tokenizer.image_encoder
        self._image_ids: frozenset[int] = (
            frozenset((encoder.special_ids.img, encoder.special_ids.img_break, encoder.special_ids.img_end))
            if encoder is not None
            else frozenset()
        )

    @classmethod
    def from_tokenizer_file(cls, path: str, *, model_name: str, max_images: int) -> TokenCounter:
        """The worker's prompt rules for the model whose tekken.json is `path`.

        A SYSTEM_PROMPT.txt beside it is the default system prompt, as in the model's folder.
        """
        tokenizer = MistralTokenizer.from_file(path, mode=ValidationMode.test)
        system_prompt = Path(path).with_name(SYSTEM_PROMPT_FILE)
        template = system_prompt.read_text(encoding="utf-8") if system_prompt.is_file() else None
        name = Path(model_name.rstrip("/")).name
        return cls(
            PromptBuilder(tokenizer, model_name=name, system_prompt_template=template, max_images=max_images)
        )

    def __call__(self, request: chat_pb2.ChatRequest) -> chat_pb2.CountTokensResponse:
        stand_in, headers = _with_stand_in_images(request)
        try:
            mistral_request, _ = self._builder.to_mistral_request(stand_in)
            for chunk, header in zip(_image_chunks(mistral_request), headers, strict=True):
                chunk.image = header
            tokens = self._tokenizer.encode_chat_completion(mistral_request).tokens
        except PromptError as exc:
            raise InvalidRequest([FieldViolation("messages", str(exc))]) from exc
        except (ValueError, AssertionError, KeyError) as exc:
            # mistral_common's validator and encoder report bad conversations with these.
            raise InvalidRequest([FieldViolation("messages", f"invalid conversation: {exc}")]) from exc
        image_tokens = sum(1 for t in tokens if t in self._image_ids)
        return chat_pb2.CountTokensResponse(prompt_tokens=len(tokens), image_tokens=image_tokens)


def _counting_tokenizer(tokenizer: Any) -> Any:
    counting = copy.copy(tokenizer)
    instruct = copy.copy(tokenizer.instruct_tokenizer)
    encoder = instruct.image_encoder
    if encoder is not None:
        instruct.image_encoder = _HeaderOnlyImageEncoder(encoder.image_config, encoder.special_ids)
    counting.instruct_tokenizer = instruct
    return counting


def _with_stand_in_images(request: chat_pb2.ChatRequest) -> tuple[chat_pb2.ChatRequest, list[Image.Image]]:
    """A copy of `request` with every image a 1x1 PNG, and the real images opened header-only, in order."""
    copied = chat_pb2.ChatRequest()
    copied.CopyFrom(request)
    headers: list[Image.Image] = []
    for message in copied.messages:
        for part in message.content:
            kind = part.WhichOneof("kind")
            if kind == "image":
                data = part.image.data
            elif kind == "image_url":
                try:
                    _, data = parse_data_url(part.image_url, _NO_LIMIT)
                except ImageProblem as exc:
                    raise InvalidRequest([FieldViolation("messages", exc.description)]) from exc
            else:
                continue
            headers.append(_open_header(data))
            part.image.CopyFrom(chat_pb2.ImageBytes(data=_STAND_IN, mime_type="image/png"))
    return copied, headers


def _open_header(data: bytes) -> Image.Image:
    mime = sniff_format(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Lazy: reads the header, decodes nothing. Validation has already bounded the dimensions.
        return Image.open(io.BytesIO(data), formats=[FORMATS[mime]] if mime else None)


def _image_chunks(mistral_request: Any) -> list[ImageChunk]:
    return [
        chunk
        for message in mistral_request.messages
        if isinstance(message.content, list)
        for chunk in message.content
        if isinstance(chunk, ImageChunk)
    ]
