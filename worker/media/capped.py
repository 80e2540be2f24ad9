"""Reading a body of unknown size with a byte cap (and optionally a deadline), for every source
that streams bytes (http(s) responses, S3 objects)."""

from __future__ import annotations

import time
from collections.abc import Callable

from worker.errors import ImageFetchTimeout, ImageTooLarge

CHUNK = 256 * 1024


def read_capped(read: Callable[[int], bytes], cap: int, *, what: str,
                deadline: float | None = None) -> bytes:
    """Call ``read(n)`` until it returns b"". ImageTooLarge once more than ``cap`` bytes came,
    ImageFetchTimeout when ``deadline`` (a ``time.monotonic()`` value) passes between reads.
    ``what`` names the source in the messages."""
    chunks, total = [], 0
    while chunk := read(min(CHUNK, cap + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise ImageTooLarge(f"{what} sent more than the {cap}-byte image cap")
        if deadline is not None and time.monotonic() > deadline:
            raise ImageFetchTimeout(f"reading {what} ran past the total fetch timeout")
    return b"".join(chunks)
