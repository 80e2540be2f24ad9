"""Image sources to RGB images: fetch (http(s), s3://, data:), decode safely, cache.

``MediaLoader`` fetches with retries (``worker.media.fetch`` for http(s), ``worker.media.s3`` for s3://),
decodes with ``worker.media.decode`` (hostile bytes, format allowlist, pixel caps) and caches.
Images returned by ``MediaLoader`` are new objects owned by the caller (copies or resized
versions of the cached ones), so one job cannot change another's image.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from producer import sources
from worker.errors import ImageFetchTimeout, ImageUrlForbidden, JobError
from worker.media.decode import decode_data_uri, decode_image, fit_pixels
from worker.media.fetch import HttpFetcher
from worker.settings import WorkerSettings
from worker.threads import pool

log = logging.getLogger("vlmq.media")

_SOURCE_ENTRIES = 2048  # source -> sha256 mappings kept (LRU)
_BACKOFF_S = 0.25


def _scheme(source: str) -> str:
    try:
        return urlsplit(source).scheme.lower()
    except ValueError:
        raise ImageUrlForbidden(f"the image source is not a valid URL: {source[:200]!r}") from None


class MediaLoader:
    """Loads image sources for jobs: fetch with retries, decode, and a bounded LRU cache.

    The cache holds decoded RGB images keyed by the sha256 of their bytes (at most
    ``image_cache_bytes`` of pixels), plus an http/s3 source -> sha256 map, so the same image in
    many jobs is fetched and decoded once per worker; concurrent loads of one source share one
    fetch. Counters for metrics: ``fetches`` (fetch attempts over the network or S3),
    ``cache_hits`` (loads answered without decoding), ``decodes``. Thread-safe.
    """

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.fetches = self.cache_hits = self.decodes = 0
        self._http = HttpFetcher(settings)
        self._s3_client: Any = None
        self._lock = threading.Lock()
        self._s3_lock = threading.Lock()
        self._hosts: dict[str, threading.BoundedSemaphore] = {}  # fetches in flight per host
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._sources: OrderedDict[str, str] = OrderedDict()
        self._cache_bytes = 0
        self._inflight: dict[str, Future[Image.Image]] = {}
        self._pool = pool(settings.fetch_concurrency, "vlmq-img")
        if settings.max_image_pixels > (Image.MAX_IMAGE_PIXELS or settings.max_image_pixels):
            log.warning(
                "max_image_pixels %d is above Pillow's own bomb limit %d, which applies",
                settings.max_image_pixels,
                Image.MAX_IMAGE_PIXELS,
            )

    @property
    def cache_bytes(self) -> int:
        return self._cache_bytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "fetches": self.fetches,
                "cache_hits": self.cache_hits,
                "decodes": self.decodes,
                "cache_bytes": self._cache_bytes,
                "cache_images": len(self._images),
            }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def load(self, source: str, *, max_pixels: int | None, deadline: float) -> Image.Image:
        """One RGB image owned by the caller; at most ``max_pixels`` pixels when given."""
        shared = self._obtain(source, deadline)
        if max_pixels is not None and shared.width * shared.height > max_pixels:
            return fit_pixels(shared, max_pixels)
        return shared.copy()

    def load_all(
        self, sources: list[str], *, max_pixels: int | None, deadline: float
    ) -> list[Image.Image]:
        """``load`` for each source, concurrently, in order. As soon as one fails, the error of
        the first source (in order) that has failed is raised and loads not yet started are
        cancelled."""
        if len(sources) <= 1:
            return [self.load(s, max_pixels=max_pixels, deadline=deadline) for s in sources]
        futures = [
            self._pool.submit(self.load, s, max_pixels=max_pixels, deadline=deadline)
            for s in sources
        ]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            error = future.exception() if future in done else None
            if error is not None:
                for other in pending:
                    other.cancel()
                raise error
        return [future.result() for future in futures]

    # -- cache and single flight ---------------------------------------------------------------

    def _obtain(self, source: str, deadline: float) -> Image.Image:
        """The shared (cached) decoded image for ``source``; never to be modified."""
        data: bytes | None = None
        if source.startswith("data:"):
            data = decode_data_uri(source, self.settings.max_image_bytes)
            key = "sha256:" + hashlib.sha256(data).hexdigest()
        else:
            scheme = _scheme(source)
            if scheme not in sources.SCHEMES:
                raise ImageUrlForbidden(sources.unsupported_scheme(scheme))
            key = "source:" + source
        with self._lock:
            cached = self._lookup(key)
            if cached is not None:
                self.cache_hits += 1
                return cached
            future = self._inflight.get(key)
            owner = future is None
            if future is None:
                future = self._inflight[key] = Future()
        if not owner:
            return self._wait(future, source, deadline)
        try:
            image = self._produce(source, data, deadline)
            future.set_result(image)
            return image
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _wait(self, future: Future[Image.Image], source: str, deadline: float) -> Image.Image:
        try:
            image = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise ImageFetchTimeout(f"timed out waiting for another fetch of {source}") from None
        except JobError as exc:  # a fresh exception per waiting job
            raise type(exc)(exc.message, retryable=exc.retryable) from None
        with self._lock:
            self.cache_hits += 1
        return image

    def _lookup(self, key: str) -> Image.Image | None:
        """(Under the lock.) The cached image for a "source:" or "sha256:" key, as most recent."""
        digest = key.removeprefix("sha256:")
        if key.startswith("source:"):
            found = self._sources.get(key)
            if found is None:
                return None
            self._sources.move_to_end(key)
            digest = found
        image = self._images.get(digest)
        if image is not None:
            self._images.move_to_end(digest)
        return image

    def _produce(self, source: str, data: bytes | None, deadline: float) -> Image.Image:
        if data is None:
            data = self._fetch_with_retries(source, deadline)
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            image = self._images.get(digest)
            if image is not None:  # same bytes under another source
                self._remember(source, digest)
                self._images.move_to_end(digest)
                self.cache_hits += 1
                return image
        image = decode_image(data, max_pixels=self.settings.max_image_pixels)
        with self._lock:
            self.decodes += 1
            self._store(digest, image)
            self._remember(source, digest)
        return image

    def _remember(self, source: str, digest: str) -> None:
        if source.startswith("data:"):
            return  # keyed by the hash of their bytes; the URI itself is not kept
        self._sources["source:" + source] = digest
        self._sources.move_to_end("source:" + source)
        while len(self._sources) > _SOURCE_ENTRIES:
            self._sources.popitem(last=False)

    def _store(self, digest: str, image: Image.Image) -> None:
        size = image.width * image.height * len(image.getbands())
        limit = self.settings.image_cache_bytes
        if size > limit or digest in self._images:
            return
        while self._images and self._cache_bytes + size > limit:
            _, old = self._images.popitem(last=False)
            self._cache_bytes -= old.width * old.height * len(old.getbands())
        self._images[digest] = image
        self._cache_bytes += size

    # -- fetching ------------------------------------------------------------------------------

    def _fetch_with_retries(self, source: str, deadline: float) -> bytes:
        attempt = 0
        while True:
            with self._lock:
                self.fetches += 1
            try:
                return self._fetch(source, deadline)
            except JobError as exc:
                delay = _BACKOFF_S * 2**attempt * random.uniform(0.75, 1.25)
                late = time.monotonic() + delay >= deadline
                if not exc.retryable or attempt >= self.settings.fetch_retries or late:
                    raise
                log.info("retrying %s in %.2fs: %s", source[:200], delay, exc.message)
                attempt += 1
                time.sleep(delay)

    def _fetch(self, source: str, deadline: float) -> bytes:
        if _scheme(source) == "s3":
            from worker.media import s3  # boto3 is imported only when an s3 source is used

            # refused before a client is built: building one looks up credentials
            s3.check_source(source, self.settings.s3_allowed_buckets)
            with self._s3_lock:
                if self._s3_client is None:
                    self._s3_client = s3.make_client(self.settings)
                client = self._s3_client
            return s3.fetch_object(
                client,
                source,
                self.settings.max_image_bytes,
                self.settings.s3_allowed_buckets,
                deadline=deadline,
            )
        host = (urlsplit(source).netloc or "?").lower()
        with self._lock:
            slot = self._hosts.setdefault(
                host, threading.BoundedSemaphore(self.settings.fetch_per_host))
        if not slot.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ImageFetchTimeout(f"{host} had {self.settings.fetch_per_host} fetches in "
                                    "flight until the fetch deadline (VLMQ_FETCH_PER_HOST)")
        try:
            return self._http.fetch(source, deadline)
        finally:
            slot.release()
