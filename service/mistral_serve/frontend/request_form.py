"""The one form a request takes after the front door: the `QueuedRequest` it will be queued as.

Built in one pass from the caller's request (copied once) and the images the checks already read:
every image is `ImageBytes` (a data: URL's decoded bytes, a fetched URL's body), each with the size
its header gave, the sampling defaults and the default system prompt switch are filled in, and
OpenAI-style tool-call ids are the model's.
The token counter, the budget check and the queue all take this form; nothing is decoded, copied or
parsed again on the way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mistral_serve.common import sampling
from mistral_serve.common.contract import model_tool_call_id
from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

from .errors import FieldViolation, InvalidRequest
from .images import CheckedImage
from .validation import PartIndex


@dataclass(slots=True)
class FrontDoorRequest:
    """A request as it will be queued, with its images' (width, height) in prompt order."""

    queued: queue_pb2.QueuedRequest
    image_sizes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def request(self) -> chat_pb2.ChatRequest:
        return self.queued.request


def build_request_form(
    request: chat_pb2.ChatRequest,
    images: Mapping[PartIndex, CheckedImage],
    *,
    path: str = "",
    max_total_image_bytes: int | None = None,
    default_system_prompt: bool = True,
) -> FrontDoorRequest:
    """`request`, validated, in the form it is queued; `images` are every image it holds, checked.

    Raises InvalidRequest when the images together are over `max_total_image_bytes` (they are
    stored in Redis with the request).
    """
    queued = queue_pb2.QueuedRequest()
    queued.request.CopyFrom(request)
    form = queued.request
    sizes: list[tuple[int, int]] = []
    total = 0
    for i, message in enumerate(form.messages):
        for j, part in enumerate(message.content):
            image = images.get((i, j))
            if image is None:
                continue
            if part.WhichOneof("kind") == "image_url":
                part.image.CopyFrom(image.as_proto())  # the oneof drops the URL
            sizes.append((image.width, image.height))
            total += len(image.data)
        for call in message.tool_calls:
            call.id = model_tool_call_id(call.id)
        if message.tool_call_id:
            message.tool_call_id = model_tool_call_id(message.tool_call_id)
    if max_total_image_bytes is not None and total > max_total_image_bytes:
        raise InvalidRequest(
            [
                FieldViolation(
                    f"{path}messages", f"the images total {total} bytes; at most {max_total_image_bytes}"
                )
            ]
        )
    sampling.apply_defaults(form.sampling)
    if not form.HasField("default_system_prompt"):
        # Decided here, once: the token count and the worker's prompt then agree whatever they read.
        form.default_system_prompt = default_system_prompt
    return FrontDoorRequest(queued, sizes)
