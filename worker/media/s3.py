"""S3 image sources (the client comes from ``producer.s3.s3_client``).

Image sources (``s3://bucket/key``) are read here; only buckets on ``s3_allowed_buckets`` are.
``check_source`` refuses the others before any client exists: building a boto3 client resolves
credentials (for the standard chain: the cloud metadata service), which a refused source, or a
worker with no S3 source configured, must never cause.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    NoCredentialsError,
    ReadTimeoutError,
)

from producer.s3 import s3_client
from worker.errors import (
    ImageFetchFailed,
    ImageFetchTimeout,
    ImageNotFound,
    ImageTooLarge,
    ImageUrlForbidden,
    JobError,
)
from worker.media.capped import read_capped
from worker.settings import WorkerSettings

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


def make_client(settings: WorkerSettings) -> Any:
    """An S3 client for ``settings`` (endpoint, region, keys; else the standard AWS chain)."""
    return s3_client(settings.s3_config(), connect_timeout=settings.fetch_connect_timeout_s,
                     read_timeout=settings.fetch_read_timeout_s,
                     retries={"max_attempts": 1, "mode": "standard"})  # MediaLoader retries


def parse_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; the key is taken verbatim (no URL decoding)."""
    if uri[:5].lower() != "s3://":
        raise ImageUrlForbidden(f"not an s3:// URI: {uri[:64]!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ImageUrlForbidden("an s3 URI must look like s3://bucket/key")
    return bucket, key


def check_source(uri: str, allowed_buckets: list[str]) -> tuple[str, str]:
    """(bucket, key) of an allowed ``s3://`` source, or ImageUrlForbidden. Needs no client."""
    bucket, key = parse_uri(uri)
    _check_bucket(bucket, allowed_buckets)
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
    bucket, key = check_source(uri, allowed_buckets)
    body = None
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        length = response.get("ContentLength")
        if isinstance(length, int) and length > max_bytes:
            raise ImageTooLarge(f"{uri} is {length} bytes; the cap is {max_bytes}")
        return read_capped(body.read, max_bytes, what=uri, deadline=deadline)
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


def _check_bucket(bucket: str, allowed_buckets: list[str]) -> None:
    if not allowed_buckets:
        raise ImageUrlForbidden(
            f"S3 bucket {bucket!r} is not allowed: no S3 bucket is allowed for image sources; "
            "list the buckets in VLMQ_S3_ALLOWED_BUCKETS (comma-separated)"
        )
    if bucket not in allowed_buckets:
        raise ImageUrlForbidden(
            f"S3 bucket {bucket!r} is not allowed (add it to VLMQ_S3_ALLOWED_BUCKETS)"
        )


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
