"""Hostile image payloads, built in memory: shared by the decoder's unit tests and the
worker-level matrix."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

from PIL import Image


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def noise(width: int, height: int, seed: int = 1) -> Image.Image:
    raw = bytes((i * 2654435761 + seed * 97) >> 7 & 0xFF for i in range(width * height * 3))
    return Image.frombytes("RGB", (width, height), raw)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of zeros: tiny file, ``width * height`` pixels when decoded."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def many_frame_gif(frames: int) -> bytes:
    """A 1x1 GIF with ``frames`` frames alternating black and white, assembled directly."""
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    blocks = []
    for index in (0, 1):
        control = b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # 10 ms per frame
        descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
        pixels = b"\x02\x02" + (b"\x44" if index == 0 else b"\x4c") + b"\x01\x00"  # LZW of 1 px
        blocks.append(control + descriptor + pixels)
    return head + loop + (blocks[0] + blocks[1]) * (frames // 2) + b"\x3b"


def psd_like() -> bytes:
    return b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 64, 64, 8, 3) + bytes(64)


DISGUISED = {
    "TIFF": lambda: encode(noise(8, 8), "TIFF"),
    "PSD": psd_like,
    "EPS": lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n",
    "PDF": lambda: encode(noise(8, 8), "PDF"),
    "BMP": lambda: encode(noise(8, 8), "BMP"),
    "ICO": lambda: encode(noise(16, 16), "ICO"),
    "TGA": lambda: encode(noise(8, 8), "TGA"),
    "SVG": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>',
    "HTML": lambda: b"<!doctype html><title>not an image</title>",
}
