"""Image checks at the front door: size, format and pixel dimensions from the header alone.

Nothing here decodes pixels. `PIL.Image.open` is lazy: it parses the header (PNG IHDR, JPEG SOF,
GIF screen descriptor, WebP canvas) and stops, so a 20000x20000 image costs a few hundred bytes of
reading before it is refused. The worker decodes the image in full only after these checks passed.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from mistral_serve.v1 import chat_pb2

# MIME type → Pillow format name, for the formats the model's image pipeline reads.
FORMATS: dict[str, str] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
}
ACCEPTED = ", ".join(FORMATS)

# Strict data URL: one image MIME type, `;base64`, nothing else (no charset, no other parameters).
_DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+);base64,", re.ASCII)
_BASE64_ALPHABET = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_side_px: int = 10000
    max_pixels: int = 50_000_000


@dataclass(frozen=True, slots=True)
class CheckedImage:
    """An image that passed the checks: its bytes (a data: URL's decoded), type and header's size."""

    data: bytes
    mime_type: str
    width: int
    height: int

    def as_proto(self) -> chat_pb2.ImageBytes:
        return chat_pb2.ImageBytes(data=self.data, mime_type=self.mime_type)


class ImageProblem(ValueError):
    """An image the service refuses; `field` is the sub-path under the image's content part."""

    def __init__(self, field: str, description: str) -> None:
        self.field = field
        self.description = description
        super().__init__(description)


class ImageTooLarge(ImageProblem):
    """The header says the image is over a bound (not: the header is incomplete)."""


def sniff_format(data: bytes) -> str | None:
    """The MIME type the leading bytes announce, or None when they are none of FORMATS."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def read_header(data: bytes) -> tuple[int, int]:
    """(width, height) from the header of an encoded image; raises ImageProblem when unreadable.

    Works on a prefix of the file too (a download in progress) as long as the header is in it.
    """
    mime = sniff_format(data)
    if mime is None:
        raise ImageProblem("data", f"the bytes are not an image of an accepted format ({ACCEPTED})")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own pixel bound; our bound is applied by the caller.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[FORMATS[mime]]) as image:
                width, height = image.size
                if _turned_on_its_side(image):
                    width, height = height, width
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge("data", f"the image has too many pixels: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageProblem("data", f"the image header cannot be read: {exc}") from exc
    return width, height


# EXIF orientations that rotate by 90 or 270 degrees: the image is shown (and the worker decodes it,
# `prompts.upright`) with width and height swapped.
_SIDEWAYS_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112


def _turned_on_its_side(image: Image.Image) -> bool:
    """Whether the EXIF orientation the header holds (JPEG's APP1, WebP's and PNG's when ahead of
    the pixels) swaps the sides."""
    try:
        return image.getexif().get(_EXIF_ORIENTATION) in _SIDEWAYS_ORIENTATIONS
    except Exception:  # a broken EXIF block: the worker keeps the pixels as stored too
        return False


def check_image(data: bytes, mime_type: str | None, limits: ImageLimits) -> CheckedImage:
    """Size, format (declared vs actual) and pixel dimensions of an encoded image, header only.

    `mime_type` None means the caller did not declare one (a downloaded image): the sniffed format
    is used.
    """
    if not data:
        raise ImageProblem("data", "image data is empty")
    if len(data) > limits.max_bytes:
        raise ImageProblem("data", f"the image is {len(data)} bytes; at most {limits.max_bytes} are accepted")
    actual = sniff_format(data)
    if mime_type is not None:
        if mime_type not in FORMATS:
            raise ImageProblem("mime_type", f"{mime_type!r} is not accepted; use one of {ACCEPTED}")
        if actual is not None and actual != mime_type:
            raise ImageProblem("mime_type", f"mime_type says {mime_type} but the bytes are {actual}")
    width, height = read_header(data)
    check_dimensions(width, height, limits)
    return CheckedImage(data, mime_type or actual or "", width, height)


def check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    if width < 1 or height < 1:
        raise ImageProblem("data", f"the image is {width}x{height} pixels")
    if max(width, height) > limits.max_side_px:
        raise ImageTooLarge(
            "data",
            f"the image is {width}x{height} pixels; its longest side may be at most {limits.max_side_px}",
        )
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            "data", f"the image is {width}x{height} pixels; at most {limits.max_pixels} pixels are accepted"
        )


def parse_data_url(url: str, limits: ImageLimits) -> tuple[str, bytes]:
    """(mime type, bytes) of a strict `data:image/<type>;base64,<payload>` URL: the service's one
    base64 decoder of images; after the front door a data URL is the ImageBytes it holds.

    The payload's size is checked from its length before it is decoded.
    """
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageProblem(
            "",
            "a data URL must read data:image/<png|jpeg|webp|gif>;base64,<payload> with no other parameters",
        )
    mime_type = match.group(1)
    if mime_type not in FORMATS:
        raise ImageProblem("", f"data URL type {mime_type!r} is not accepted; use one of {ACCEPTED}")
    payload = url[match.end() :]
    if len(payload) // 4 * 3 > limits.max_bytes + 2:
        raise ImageProblem("", f"the data URL's image is over {limits.max_bytes} bytes")
    raw = payload.encode("ascii", errors="replace")
    if len(raw) % 4 != 0 or _BASE64_ALPHABET.fullmatch(raw) is None:
        raise ImageProblem("", "the data URL's payload is not canonical base64 (no whitespace, padded)")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageProblem("", f"the data URL's payload is not valid base64: {exc}") from exc
    return mime_type, data
