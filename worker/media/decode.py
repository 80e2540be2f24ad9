"""Untrusted image bytes to RGB images, safely; ``data:`` URIs to bytes.

Decoding only ever tries JPEG, PNG, WEBP and GIF; the pixel count is checked from the header
before any pixel is decoded; animated images give their first frame only; EXIF orientation is
applied; transparency is composited onto white; the result is RGB.

Pillow's global state is left alone: ``Image.MAX_IMAGE_PIXELS`` keeps its default (so Pillow's
own bomb check, about 89 M pixels, still applies above ``max_image_pixels``), and
``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False. ``Image.DecompressionBombWarning`` is turned into
an error around ``Image.open`` with ``warnings.catch_warnings`` under a module lock (the warnings
filter list is process-wide; the lock keeps this module's own threads from interleaving).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import threading
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from producer import sources
from worker.errors import ImageInvalid, ImageTooLarge, ImageUnsupportedFormat

log = logging.getLogger("vlmq.media")  # the logger name it had inside worker.media.loader

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")
_OPEN_LOCK = threading.Lock()


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """A new RGB image from ``data``: first frame, EXIF orientation applied, alpha on white.

    ImageInvalid for empty, truncated or corrupt bytes; ImageUnsupportedFormat for anything but
    JPEG/PNG/WEBP/GIF; ImageTooLarge when the header declares more than ``max_pixels`` pixels.
    """
    image = _open_header(data)
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageInvalid(f"the image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"the image is {width}x{height} = {width * height} pixels; the cap is {max_pixels}"
            )
        try:
            image.load()  # the current (first) frame only; other frames are never read
        except MemoryError:
            raise ImageTooLarge("out of memory decoding the image") from None
        except Exception as exc:
            raise _invalid(exc, f"the {image.format} image does not decode") from None
        try:
            frame = ImageOps.exif_transpose(image)  # always a new image
        except Exception as exc:  # hostile EXIF: keep the pixels as stored
            log.debug("ignoring unreadable EXIF orientation: %s", exc)
            frame = image.copy()
        return _to_rgb(frame)


def _open_header(data: bytes) -> Image.Image:
    """The image with only its header read; the typed error for bytes that are not one."""
    if not data:
        raise ImageInvalid("the image is empty (zero bytes)")
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image declares too many pixels to decode safely: {exc}") from None
    except UnidentifiedImageError:
        if data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise ImageInvalid("the image header is corrupt or truncated") from None
        raise ImageUnsupportedFormat(
            "the bytes are not a JPEG, PNG, WEBP or GIF image (other formats are refused)"
        ) from None
    except MemoryError:
        raise ImageTooLarge("out of memory reading the image header") from None
    except Exception as exc:
        raise _invalid(exc, "the image header does not parse") from None


def _invalid(error: Exception, what: str) -> ImageInvalid | ImageTooLarge:
    """A decode error; a compressed chunk (zTXt, iTXt, iCCP) over Pillow's limit is a
    decompression bomb: ImageTooLarge, as the error table lists bombs."""
    if "too large" in str(error).lower():
        return ImageTooLarge(f"{what}: a decompression bomb ({error})")
    return ImageInvalid(f"{what}: {error}")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):  # 16-bit PNG: scale to 8 bits
        return image.convert("I").point(lambda v: v * (1 / 256)).convert("L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """``image`` downscaled (aspect ratio kept, bicubic) to at most ``max_pixels`` pixels."""
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = (max_pixels / (width * height)) ** 0.5
    new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
    if new_w * new_h > max_pixels:  # very long, thin images: the short side is stuck at 1
        new_w, new_h = min(new_w, max(1, max_pixels // new_h)), min(new_h, max_pixels)
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def decode_data_uri(source: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URI, at most ``max_bytes`` of them."""
    match = sources.DATA_URI.match(source)
    if not match:
        raise ImageUnsupportedFormat(f"unsupported data: URI: {sources.DATA_URI_SHAPE}")
    payload = source[match.end() :]
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise ImageTooLarge(f"the data: URI holds more than the {max_bytes}-byte image cap")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInvalid("the data: URI payload is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the data: URI holds {len(data)} bytes; the cap is {max_bytes}")
    return data
