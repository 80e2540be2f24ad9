"""Image loading (interim): http(s) with timeouts and a byte cap, data: URIs, Pillow decode."""

from __future__ import annotations

import base64
import io
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image, ImageOps

from worker.errors import (
    ImageFetchFailed,
    ImageFetchTimeout,
    ImageInvalid,
    ImageNotFound,
    ImageTooLarge,
    ImageUnsupportedFormat,
    ImageUrlForbidden,
)
from worker.settings import WorkerSettings

FORMATS = ["JPEG", "PNG", "WEBP", "GIF"]


class MediaLoader:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vlmq-fetch")

    def load_all(self, sources: list[str], *, max_pixels: int | None, deadline: float) -> list[Any]:
        return list(self._pool.map(lambda s: self.load(s, max_pixels=max_pixels,
                                                       deadline=deadline), sources))

    def load(self, source: str, *, max_pixels: int | None, deadline: float) -> Any:
        return self._decode(self._fetch(source, deadline), max_pixels)

    def _fetch(self, source: str, deadline: float) -> bytes:
        if source.startswith("data:"):
            return base64.b64decode(source.split(",", 1)[1])
        if source.startswith("s3://"):
            raise ImageUrlForbidden("s3 image sources need a configured bucket allowlist")
        timeout = min(self.settings.fetch_read_timeout_s, max(0.1, deadline - time.monotonic()))
        try:
            with urllib.request.urlopen(source, timeout=timeout) as response:
                data = response.read(self.settings.max_image_bytes + 1)
        except urllib.error.HTTPError as error:
            if error.code in (404, 410):
                raise ImageNotFound(f"image not found: HTTP {error.code} from {source}") from None
            raise ImageFetchFailed(f"HTTP {error.code} from {source}") from None
        except TimeoutError:
            raise ImageFetchTimeout(f"timed out fetching {source}") from None
        except OSError as error:
            raise ImageFetchFailed(f"cannot fetch {source}: {error}") from None
        if len(data) > self.settings.max_image_bytes:
            raise ImageTooLarge(f"image larger than {self.settings.max_image_bytes} bytes")
        return data

    def _decode(self, data: bytes, max_pixels: int | None) -> Any:
        if not data:
            raise ImageInvalid("the image is empty (zero bytes)")
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.UnidentifiedImageError:
            raise ImageUnsupportedFormat("not a JPEG, PNG, WEBP or GIF image") from None
        try:
            image.load()
            image = ImageOps.exif_transpose(image).convert("RGB")
        except OSError as error:
            raise ImageInvalid(f"the image does not decode: {error}") from None
        if max_pixels and image.width * image.height > max_pixels:
            scale = (max_pixels / (image.width * image.height)) ** 0.5
            image = image.resize((max(1, int(image.width * scale)),
                                  max(1, int(image.height * scale))))
        return image
