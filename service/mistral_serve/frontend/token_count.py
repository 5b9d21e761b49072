"""Prompt tokens of a request, counted before admission exactly as the worker's prompt builds.

The conversation goes through the shared `PromptBuilder` and `mistral_common`'s
`encode_chat_completion` (its validator included), so text tokens, the default system prompt and
the chat template are the worker's. Images are never decoded: the builder's image loader hands
`mistral_common` an image that has only the size the front door read from its header, and the counting
tokenizer's image encoder turns that size into tokens with `mistral_common`'s own
`ImageEncoder._image_to_num_tokens` (patch 14, spatial merge 2, longest side 1540 for this model: one
[IMG] per merged patch, an [IMG_BREAK] per row, [IMG_END] last).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.image import ImageEncoder, ImageEncoding
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from mistral_serve.common.prompts import SYSTEM_PROMPT_FILE, PromptBuilder, PromptError, prompt_fingerprint
from mistral_serve.v1 import chat_pb2

from .errors import FieldViolation, InvalidRequest
from .request_form import FrontDoorRequest


class _SizeOnlyImage(Image.Image):
    """A PIL image of a known size that holds no pixels: the counting encoder reads only its size."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self._size = size


class _HeaderOnlyImageEncoder(ImageEncoder):
    """mistral_common's image token rule, applied to the image's size alone."""

    def __call__(self, content: Any) -> ImageEncoding:
        w, h = self._image_to_num_tokens(content.image)
        tokens = ([self.special_ids.img] * w + [self.special_ids.img_break]) * h
        tokens[-1] = self.special_ids.img_end
        return ImageEncoding(tokens=tokens, image=np.zeros((3, 1, 1), dtype=np.float32))


# The size (serialized bytes) of a request that is still counted on the event loop: encoding about
# 4 kB of conversation takes about half a millisecond here, less than handing the work to a thread
# and back costs the loop. Larger requests, and any with images, are counted on a thread.
INLINE_COUNT_BYTES = 4096


class TokenCounter:
    """`FrontDoorRequest -> CountTokensResponse`; raises InvalidRequest for a conversation the model
    refuses."""

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
    def from_tokenizer_file(cls, path: str, *, model_name: str) -> TokenCounter:
        """The worker's prompt rules for the model whose tekken.json is `path`.

        A SYSTEM_PROMPT.txt beside it is the default system prompt, as in the model's folder.
        """
        tokenizer = MistralTokenizer.from_file(path, mode=ValidationMode.test)
        system_prompt = Path(path).with_name(SYSTEM_PROMPT_FILE)
        template = system_prompt.read_text(encoding="utf-8") if system_prompt.is_file() else None
        name = Path(model_name.rstrip("/")).name  # as PromptBuilder.from_model names it
        fingerprint = prompt_fingerprint(Path(path), model_name=name, system_prompt_template=template)
        return cls(
            PromptBuilder(
                tokenizer, model_name=name, system_prompt_template=template, fingerprint=fingerprint
            )
        )

    @property
    def fingerprint(self) -> str:
        """The prompt builder's `prompt_fingerprint`: a worker with the same one can run the ids."""
        return self._builder.fingerprint

    def __call__(self, form: FrontDoorRequest) -> chat_pb2.CountTokensResponse:
        return self.counted(self.encode(form))

    def cheap(self, form: FrontDoorRequest) -> bool:
        """Whether `form` is small enough to encode on the event loop (see INLINE_COUNT_BYTES)."""
        return not form.image_sizes and form.request.ByteSize() <= INLINE_COUNT_BYTES

    def counted(self, tokens: Sequence[int]) -> chat_pb2.CountTokensResponse:
        image_tokens = sum(1 for t in tokens if t in self._image_ids) if self._image_ids else 0
        return chat_pb2.CountTokensResponse(prompt_tokens=len(tokens), image_tokens=image_tokens)

    def encode(self, form: FrontDoorRequest) -> list[int]:
        """The prompt's token ids (an image's are its size's); raises InvalidRequest."""
        sizes: Iterator[tuple[int, int]] = iter(form.image_sizes)
        try:
            mistral_request, _ = self._builder.to_mistral_request(
                form.request, image_loader=lambda _: _SizeOnlyImage(next(sizes))
            )
            tokens = self._tokenizer.encode_chat_completion(mistral_request).tokens
        except PromptError as exc:
            raise InvalidRequest([FieldViolation("messages", str(exc))]) from exc
        except (ValueError, AssertionError, KeyError) as exc:
            # mistral_common's validator and encoder report bad conversations with these.
            raise InvalidRequest([FieldViolation("messages", f"invalid conversation: {exc}")]) from exc
        return list(tokens)


def _counting_tokenizer(tokenizer: Any) -> Any:
    counting = copy.copy(tokenizer)
    instruct = copy.copy(tokenizer.instruct_tokenizer)
    encoder = instruct.image_encoder
    if encoder is not None:
        instruct.image_encoder = _HeaderOnlyImageEncoder(encoder.image_config, encoder.special_ids)
    counting.instruct_tokenizer = instruct
    return counting
