"""S3 access for the worker: the one module that imports boto3.

Image sources (``s3://bucket/key``) are read here; only buckets on ``s3_allowed_buckets`` are.
"""

from __future__ import annotations

import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    NoCredentialsError,
    ReadTimeoutError,
)

from worker.errors import (
    ImageFetchFailed,
    ImageFetchTimeout,
    ImageNotFound,
    ImageTooLarge,
    ImageUrlForbidden,
    JobError,
)
from worker.settings import WorkerSettings

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_CHUNK = 256 * 1024


def make_client(settings: WorkerSettings) -> Any:
    """An S3 client for ``settings`` (endpoint, region, keys; else the standard AWS chain)."""
    secret = settings.s3_secret_access_key
    config = Config(
        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
        connect_timeout=settings.fetch_connect_timeout_s,
        read_timeout=settings.fetch_read_timeout_s,
        retries={"max_attempts": 1, "mode": "standard"},  # MediaLoader retries, within deadlines
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region or None,
        aws_access_key_id=settings.s3_access_key_id or None,
        aws_secret_access_key=secret.get_secret_value() if secret is not None else None,
        config=config,
    )


def parse_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; the key is taken verbatim (no URL decoding)."""
    if uri[:5].lower() != "s3://":
        raise ImageUrlForbidden(f"not an s3:// URI: {uri[:64]!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ImageUrlForbidden("an s3 URI must look like s3://bucket/key")
    return bucket, key


def fetch_object(
    client: Any,
    uri: str,
    max_bytes: int,
    allowed_buckets: list[str],
    *,
    deadline: float | None = None,
) -> bytes:
    """The bytes of the object at ``uri``, at most ``max_bytes`` of them.

    ImageUrlForbidden for a bucket not on ``allowed_buckets``, ImageNotFound for a missing key or
    bucket, ImageTooLarge over the cap, ImageFetchTimeout for timeouts (and past ``deadline``, a
    ``time.monotonic()`` value), ImageFetchFailed otherwise (retryable unless a client error).
    """
    bucket, key = parse_uri(uri)
    if not allowed_buckets:
        raise ImageUrlForbidden(
            f"S3 bucket {bucket!r} is not allowed: no S3 bucket is allowed for image sources; "
            "list the buckets in VLMQ_S3_ALLOWED_BUCKETS (comma-separated)"
        )
    if bucket not in allowed_buckets:
        raise ImageUrlForbidden(
            f"S3 bucket {bucket!r} is not allowed (add it to VLMQ_S3_ALLOWED_BUCKETS)"
        )
    body = None
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        length = response.get("ContentLength")
        if isinstance(length, int) and length > max_bytes:
            raise ImageTooLarge(f"{uri} is {length} bytes; the cap is {max_bytes}")
        chunks, total = [], 0
        while chunk := body.read(min(_CHUNK, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise ImageTooLarge(f"{uri} is larger than the {max_bytes}-byte cap")
            if deadline is not None and time.monotonic() > deadline:
                raise ImageFetchTimeout(f"reading {uri} ran past the total fetch timeout")
        return b"".join(chunks)
    except JobError:
        raise
    except ClientError as exc:
        raise _client_error(exc, uri) from exc
    except (ConnectTimeoutError, ReadTimeoutError, TimeoutError) as exc:
        raise ImageFetchTimeout(f"reading {uri} timed out: {exc}") from exc
    except NoCredentialsError as exc:
        raise ImageFetchFailed(f"no S3 credentials to read {uri}", retryable=False) from exc
    except (BotoCoreError, OSError) as exc:
        raise ImageFetchFailed(f"reading {uri} failed: {exc}", retryable=True) from exc
    finally:
        if body is not None:
            body.close()


def _client_error(exc: ClientError, uri: str) -> JobError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in _NOT_FOUND or status == 404:
        return ImageNotFound(f"{uri} does not exist ({code or status})")
    # Permission and request errors (403, 400...) will not change on retry; throttling and 5xx may.
    retryable = not (400 <= status < 500) or status in (408, 429) or code == "SlowDown"
    message = error.get("Message") or code or str(status)
    return ImageFetchFailed(f"reading {uri} failed: {code} {message}", retryable=retryable)
