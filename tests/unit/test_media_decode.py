"""worker.media.decode and worker.media.loader: hostile images, conversions, data: URIs,
retries, the cache, S3 sources."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import GifImagePlugin, Image, ImageFile

from tests.hostile import DISGUISED, encode, many_frame_gif, noise, png_bomb
from worker.errors import (
    ImageFetchFailed,
    ImageInvalid,
    ImageNotFound,
    ImageTooLarge,
    ImageUnsupportedFormat,
    ImageUrlForbidden,
    JobError,
)
from worker.media import loader as media
from worker.media.decode import decode_image, fit_pixels
from worker.media.loader import MediaLoader
from worker.settings import WorkerSettings

CAP = 40_000_000


def make_settings(**overrides: Any) -> WorkerSettings:
    return WorkerSettings(**overrides)


def later(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


# -- hostile images -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "cap"),
    [
        (20_000, 20_000, CAP),  # above twice Pillow's own limit: DecompressionBombError
        (10_000, 10_000, 200_000_000),  # above Pillow's limit: its warning is an error here
        (8_000, 8_000, CAP),  # under Pillow's limit, over ours: checked from the header
        (2_000, 2_000, 1_000_000),
    ],
)
def test_png_decompression_bombs(width: int, height: int, cap: int,
                                 monkeypatch: pytest.MonkeyPatch):
    bomb = png_bomb(width, height)
    assert len(bomb) < 64 * 1024
    filters, pillow_cap = list(warnings.filters), Image.MAX_IMAGE_PIXELS

    def load(self: Any) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)  # refused from the header alone
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, max_pixels=cap)
    assert warnings.filters == filters and pillow_cap == Image.MAX_IMAGE_PIXELS


def test_a_modest_png_of_zeros_decodes():
    image = decode_image(png_bomb(300, 200), max_pixels=CAP)
    assert image.size == (300, 200) and image.mode == "RGB"


def test_ten_thousand_frame_gif_gives_the_first_frame_fast(monkeypatch: pytest.MonkeyPatch):
    gif = many_frame_gif(10_000)
    with Image.open(io.BytesIO(gif)) as check:
        assert getattr(check, "n_frames", 1) == 10_000
    seeks: list[int] = []
    real_seek = GifImagePlugin.GifImageFile.seek

    def seek(self: Any, frame: int) -> None:
        seeks.append(frame)
        real_seek(self, frame)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "seek", seek)
    image = MediaLoader(make_settings()).load(
        data_uri(gif, "image/gif"), max_pixels=None, deadline=later()
    )
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (0, 0, 0)
    assert all(frame == 0 for frame in seeks)


@pytest.mark.parametrize("kind", sorted(DISGUISED))
def test_other_formats_disguised_as_png_are_refused(kind: str):
    payload = DISGUISED[kind]()
    with pytest.raises(ImageUnsupportedFormat):
        decode_image(payload, max_pixels=CAP)
    with pytest.raises(ImageUnsupportedFormat):
        MediaLoader(make_settings()).load(data_uri(payload), max_pixels=None, deadline=later())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_truncated_images_are_invalid(fmt: str):
    whole = encode(noise(64, 64).convert("P") if fmt == "GIF" else noise(64, 64), fmt)
    assert decode_image(whole, max_pixels=CAP).size == (64, 64)
    for cut in (len(whole) // 2, 12):
        with pytest.raises(ImageInvalid):
            decode_image(whole[:cut], max_pixels=CAP)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_zero_bytes_are_invalid():
    with pytest.raises(ImageInvalid, match="empty"):
        decode_image(b"", max_pixels=CAP)


MAGIC = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(MAGIC), tail=st.binary(max_size=2048))
def test_random_bytes_only_raise_job_errors(prefix: bytes, tail: bytes):
    try:
        image = decode_image(prefix + tail, max_pixels=1_000_000)
    except JobError:
        return
    assert image.mode == "RGB"


SAMPLES = {
    fmt: encode(noise(24, 16).convert("P") if fmt == "GIF" else noise(24, 16), fmt)
    for fmt in ("JPEG", "PNG", "GIF", "WEBP")
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(SAMPLES)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
)
def test_corrupted_images_only_raise_job_errors(fmt: str, edits: list[tuple[int, int]]):
    data = bytearray(SAMPLES[fmt])
    for position, value in edits:
        data[position % len(data)] = value
    try:
        image = decode_image(bytes(data), max_pixels=1_000_000)
    except JobError:
        return
    assert image.mode == "RGB" and image.width * image.height <= 1_000_000


# -- orientation, modes, sizes ------------------------------------------------------------------


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), max_pixels=CAP)
    assert decoded.size == (20, 40)
    top, bottom = decoded.getpixel((10, 5)), decoded.getpixel((10, 35))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and top[2] < 60  # red is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return encode(image, "PNG", transparency=1)


@pytest.mark.parametrize(
    ("name", "payload", "corner"),
    [
        ("RGBA transparent", lambda: encode(Image.new("RGBA", (4, 4), (9, 9, 9, 0)), "PNG"),
         (255, 255, 255)),
        ("RGBA opaque", lambda: encode(Image.new("RGBA", (4, 4), (10, 20, 30, 255)), "PNG"),
         (10, 20, 30)),
        ("LA", lambda: encode(Image.new("LA", (4, 4), (0, 0)), "PNG"), (255, 255, 255)),
        ("P+tRNS", _palette_with_transparency, (255, 255, 255)),
        ("P", lambda: encode(Image.new("P", (4, 4), 0), "GIF"), (0, 0, 0)),
        ("L", lambda: encode(Image.new("L", (4, 4), 77), "PNG"), (77, 77, 77)),
        ("1", lambda: encode(Image.new("1", (4, 4), 1), "PNG"), (255, 255, 255)),
        ("I;16", lambda: encode(Image.new("I;16", (4, 4), 0x8000), "PNG"), (128, 128, 128)),
        ("CMYK", lambda: encode(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"), None),
        ("WEBP RGBA", lambda: encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "WEBP",
                                     lossless=True), (255, 255, 255)),
    ],
)  # fmt: skip
def test_every_mode_comes_out_rgb(name: str, payload: Any, corner: tuple[int, int, int] | None):
    image = decode_image(payload(), max_pixels=CAP)
    assert image.mode == "RGB" and image.size == (4, 4)
    if corner is not None:
        assert image.getpixel((0, 0)) == corner


def test_max_pixels_downscales_keeping_the_aspect_ratio():
    loader = MediaLoader(make_settings())
    source = data_uri(encode(noise(400, 200), "PNG"))
    small = loader.load(source, max_pixels=20_000, deadline=later())
    assert small.width * small.height <= 20_000 and abs(small.width / small.height - 2) < 0.05
    assert loader.load(source, max_pixels=None, deadline=later()).size == (400, 200)
    assert loader.load(source, max_pixels=80_000, deadline=later()).size == (400, 200)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 600), height=st.integers(1, 600), cap=st.integers(1, 50_000))
def test_fit_pixels_bounds(width: int, height: int, cap: int):
    fitted = fit_pixels(Image.new("RGB", (width, height)), cap)
    assert fitted.width >= 1 and fitted.height >= 1
    assert fitted.width * fitted.height <= max(cap, 1)
    if width * height <= cap:
        assert fitted.size == (width, height)


# -- data: URIs and sources ---------------------------------------------------------------------


def test_data_uris():
    loader = MediaLoader(make_settings(max_image_bytes=4096))
    good = encode(noise(8, 8), "PNG")
    assert loader.load(data_uri(good), max_pixels=None, deadline=later()).size == (8, 8)
    with pytest.raises(ImageInvalid, match="base64"):
        loader.load("data:image/png;base64,iVBOR*w0K==", max_pixels=None, deadline=later())
    with pytest.raises(ImageTooLarge):
        loader.load(data_uri(bytes(5000)), max_pixels=None, deadline=later())
    with pytest.raises(ImageUnsupportedFormat):
        loader.load(data_uri(good, "text/html"), max_pixels=None, deadline=later())


@pytest.mark.parametrize(
    "source", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "a.png"]
)
def test_other_schemes_are_forbidden(source: str):
    with pytest.raises(ImageUrlForbidden):
        MediaLoader(make_settings()).load(source, max_pixels=None, deadline=later())


def test_importing_media_does_not_import_boto3():
    code = "import sys, worker.media.loader; assert 'boto3' not in sys.modules, 'boto3 imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- retries ------------------------------------------------------------------------------------


class FakeHttp:
    """Stands in for HttpFetcher: answers from ``bodies`` by URL, failing as scripted first."""

    def __init__(self, bodies: dict[str, bytes], failures: list[JobError] | None = None,
                 delay: float = 0.0) -> None:  # fmt: skip
        self.bodies, self.failures, self.delay = bodies, list(failures or []), delay
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def fetch(self, url: str, deadline: float) -> bytes:
        with self._lock:
            self.calls.append(url)
            failure = self.failures.pop(0) if self.failures else None
        time.sleep(self.delay)
        if failure is not None:
            raise failure
        return self.bodies[url]


def loader_with(fake: FakeHttp, **overrides: Any) -> MediaLoader:
    loader = MediaLoader(make_settings(**overrides))
    loader._http = fake  # type: ignore[assignment]
    return loader


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "_BACKOFF_S", 0.01)


def test_retryable_errors_are_retried():
    url = "http://img.test/a.png"
    fake = FakeHttp({url: encode(noise(8, 8), "PNG")}, [ImageFetchFailed("503")] * 2)
    loader = loader_with(fake, fetch_retries=2)
    assert loader.load(url, max_pixels=None, deadline=later()).size == (8, 8)
    assert len(fake.calls) == 3 and loader.fetches == 3


def test_retries_give_up():
    url = "http://img.test/a.png"
    fake = FakeHttp({}, [ImageFetchFailed("503")] * 5)
    with pytest.raises(ImageFetchFailed):
        loader_with(fake, fetch_retries=2).load(url, max_pixels=None, deadline=later())
    assert len(fake.calls) == 3


def test_permanent_errors_and_late_deadlines_are_not_retried(monkeypatch: pytest.MonkeyPatch):
    url = "http://img.test/a.png"
    fake = FakeHttp({}, [ImageNotFound("404")])
    with pytest.raises(ImageNotFound):
        loader_with(fake).load(url, max_pixels=None, deadline=later())
    assert len(fake.calls) == 1
    monkeypatch.setattr(media, "_BACKOFF_S", 5.0)
    fake = FakeHttp({}, [ImageFetchFailed("503")] * 3)
    with pytest.raises(ImageFetchFailed):
        loader_with(fake).load(url, max_pixels=None, deadline=later(1.0))
    assert len(fake.calls) == 1


# -- the cache ----------------------------------------------------------------------------------


def test_same_bytes_are_decoded_once():
    png = encode(noise(32, 32), "PNG")
    urls = {"http://a.test/1.png": png, "http://b.test/same.png": png}
    fake = FakeHttp(urls)
    loader = loader_with(fake)
    first = loader.load("http://a.test/1.png", max_pixels=None, deadline=later())
    again = loader.load("http://a.test/1.png", max_pixels=None, deadline=later())
    other = loader.load("http://b.test/same.png", max_pixels=None, deadline=later())
    as_data = loader.load(data_uri(png, "image/jpeg"), max_pixels=None, deadline=later())
    assert fake.calls == ["http://a.test/1.png", "http://b.test/same.png"]
    assert loader.decodes == 1 and loader.cache_hits == 3 and loader.fetches == 2
    assert len({id(first), id(again), id(other), id(as_data)}) == 4  # each caller owns its copy
    first.paste((1, 2, 3), (0, 0, 32, 32))
    assert loader.load("http://a.test/1.png", max_pixels=None, deadline=later()).getpixel(
        (0, 0)
    ) == other.getpixel((0, 0)) != (1, 2, 3)


def test_concurrent_loads_of_one_source_fetch_once():
    url = "http://img.test/slow.png"
    fake = FakeHttp({url: encode(noise(16, 16), "PNG")}, delay=0.2)
    loader = loader_with(fake)
    images = loader.load_all([url] * 4, max_pixels=None, deadline=later())
    assert [image.size for image in images] == [(16, 16)] * 4
    assert fake.calls == [url] and loader.decodes == 1 and loader.cache_hits == 3


def test_the_cache_is_bounded_and_lru():
    size = 20 * 20 * 3
    loader = MediaLoader(make_settings(image_cache_bytes=3 * size))
    sources = [data_uri(encode(noise(20, 20, seed), "PNG")) for seed in range(5)]
    for source in sources:
        loader.load(source, max_pixels=None, deadline=later())
    assert loader.cache_bytes <= 3 * size and loader.stats()["cache_images"] == 3
    assert loader.decodes == 5
    loader.load(sources[4], max_pixels=None, deadline=later())  # most recent: still cached
    assert loader.decodes == 5
    loader.load(sources[0], max_pixels=None, deadline=later())  # least recent: evicted
    assert loader.decodes == 6 and loader.cache_bytes <= 3 * size

    too_big = MediaLoader(make_settings(image_cache_bytes=size - 1))
    too_big.load(sources[0], max_pixels=None, deadline=later())
    assert too_big.cache_bytes == 0
    off = MediaLoader(make_settings(image_cache_bytes=0))
    for _ in range(2):
        off.load(sources[1], max_pixels=None, deadline=later())
    assert off.decodes == 2 and off.cache_hits == 0


def test_load_all_keeps_order_and_raises():
    loader = MediaLoader(make_settings())
    sizes = [(10 + i, 5 + i) for i in range(6)]
    sources = [data_uri(encode(noise(w, h), "PNG")) for w, h in sizes]
    assert [im.size for im in loader.load_all(sources, max_pixels=None, deadline=later())] == sizes
    with pytest.raises(ImageInvalid):
        loader.load_all([*sources[:3], data_uri(b"\x89PNG\r\n\x1a\n")], max_pixels=None,
                        deadline=later())  # fmt: skip
    assert loader.load_all([], max_pixels=None, deadline=later()) == []


# -- S3 sources (moto, in process) --------------------------------------------------------------


def test_s3_sources():
    moto = pytest.importorskip("moto")
    png = encode(noise(12, 9), "PNG")
    with moto.mock_aws():
        overrides: dict[str, Any] = {
            "s3_region": "us-east-1",
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
            "max_image_bytes": 4096,
        }
        loader = MediaLoader(make_settings(s3_allowed_buckets=["imgs"], **overrides))
        from worker.media import s3

        client = s3.make_client(loader.settings)
        client.create_bucket(Bucket="imgs")
        client.put_object(Bucket="imgs", Key="a/b.png", Body=png)
        client.put_object(Bucket="imgs", Key="big.png", Body=bytes(5000))
        assert loader.load("s3://imgs/a/b.png", max_pixels=None, deadline=later()).size == (12, 9)
        with pytest.raises(ImageNotFound):
            loader.load("s3://imgs/missing.png", max_pixels=None, deadline=later())
        with pytest.raises(ImageTooLarge):
            loader.load("s3://imgs/big.png", max_pixels=None, deadline=later())
        with pytest.raises(ImageUrlForbidden, match="not allowed"):
            loader.load("s3://other/a/b.png", max_pixels=None, deadline=later())
        closed = MediaLoader(make_settings(**overrides))
        with pytest.raises(ImageUrlForbidden, match="VLMQ_S3_ALLOWED_BUCKETS"):
            closed.load("s3://imgs/a/b.png", max_pixels=None, deadline=later())


@pytest.mark.parametrize("kind,prefix", [(b"zTXt", b"k\0\0"), (b"iCCP", b"p\0\0")])
@pytest.mark.parametrize("where", ["before-idat", "after-idat"])
def test_compressed_chunk_bombs_are_too_large(kind: bytes, prefix: bytes, where: str) -> None:
    """A text or colour-profile chunk that inflates past Pillow's limit is a bomb, as the error
    table says (IMAGE_TOO_LARGE), wherever it sits."""
    import zlib

    from tests.conftest import make_image
    from tests.hostile import png_chunk
    from worker.errors import ImageTooLarge

    png = make_image(8, 8, 1)
    at = (png.index(b"IDAT") if where == "before-idat" else png.index(b"IEND")) - 4
    chunk = png_chunk(kind, prefix + zlib.compress(b"\0" * (50 * 1024 * 1024), 9))
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        decode_image(png[:at] + chunk + png[at:], max_pixels=10**6)
