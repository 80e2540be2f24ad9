"""Image sources a request may name, shared by the producer's validation and the worker's loader:
http(s) URLs, ``s3://bucket/key`` and base64 ``data:image/...`` URIs."""

from __future__ import annotations

import re

SCHEMES = ("http", "https", "s3")
DATA_URI = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)
DATA_URI_SHAPE = "a data: URI must look like data:image/<type>;base64,<payload>"


def unsupported_scheme(scheme: str) -> str:
    """The message for a source whose scheme is none of the above."""
    return (f"unsupported image source scheme {scheme or '(none)'!r}: "
            "use http(s)://, s3://bucket/key or data:image/...;base64,")
