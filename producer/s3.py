"""Results that workers wrote to S3: read them back, or hand out a presigned URL.

A job whose record has ``result_uri`` (``s3://bucket/prefix/{job_id}.json``) keeps its JobResult
JSON in that object instead of the record's ``result`` field. boto3 is imported here (the one
module of vlmq that does, for producers and workers alike), and only when a client is built
(``pip install 'vlmq[s3]'``), so ``import producer`` never pulls it in. Endpoint, region and
credentials come from ``S3Config``; left unset, boto3's standard chain (AWS_* environment,
~/.aws, instance roles) applies. A custom endpoint (MinIO) is addressed path-style.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from producer.errors import ResultUnavailable
from producer.schema import JobResult


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Config:
        """The worker's names: VLMQ_S3_ENDPOINT_URL, VLMQ_S3_REGION, VLMQ_S3_ACCESS_KEY_ID,
        VLMQ_S3_SECRET_ACCESS_KEY."""
        return cls(endpoint_url=env.get("VLMQ_S3_ENDPOINT_URL") or None,
                   region=env.get("VLMQ_S3_REGION") or None,
                   access_key_id=env.get("VLMQ_S3_ACCESS_KEY_ID") or None,
                   secret_access_key=env.get("VLMQ_S3_SECRET_ACCESS_KEY") or None)


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc or not parts.path.strip("/"):
        raise ResultUnavailable(f"not an s3://bucket/key URI: {uri!r}")
    return parts.netloc, parts.path.lstrip("/")


def s3_client(config: S3Config, **options: Any) -> Any:
    """A boto3 S3 client for ``config`` (unset fields: boto3's standard chain), custom
    endpoints path-style; ``options`` go to botocore's Config (timeouts, retries). The one
    place vlmq imports boto3, lazily: ResultUnavailable when it is not installed."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ResultUnavailable("this needs boto3: pip install 'vlmq[s3]'") from None
    kwargs: dict[str, Any] = {}
    if config.endpoint_url:
        kwargs["endpoint_url"] = config.endpoint_url
    if config.region:
        kwargs["region_name"] = config.region
    if config.access_key_id and config.secret_access_key:
        kwargs["aws_access_key_id"] = config.access_key_id
        kwargs["aws_secret_access_key"] = config.secret_access_key
    style = "path" if config.endpoint_url else "auto"
    return boto3.session.Session().client(
        "s3", config=Config(s3={"addressing_style": style}, **options), **kwargs)


class ResultReader:
    """One lazily built boto3 client per producer (boto3 clients are thread-safe)."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = s3_client(self.config)
            return self._client

    def read(self, uri: str) -> JobResult:
        bucket, key = split_uri(uri)
        client = self.client()
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as error:  # botocore's errors: not importable without boto3
            raise ResultUnavailable(
                f"cannot read the result at {uri}: {_describe(error)}") from None
        return JobResult.model_validate_json(body)

    def presign(self, uri: str, expires_s: int) -> str:
        bucket, key = split_uri(uri)
        try:
            return str(self.client().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s))
        except ResultUnavailable:
            raise
        except Exception as error:
            raise ResultUnavailable(f"cannot sign a URL for {uri}: {_describe(error)}") from None


def _describe(error: Exception) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        info = response.get("Error", {})
        code = info.get("Code", "")
        if code == "NoSuchBucket":
            name = info.get("BucketName")
            return f"bucket {name!r} does not exist" if name else "the bucket does not exist"
        if code in ("NoSuchKey", "404"):
            return "no such object (deleted, or expired by a lifecycle rule)"
        return f"{code}: {info.get('Message', '')}".rstrip(": ")
    return f"{type(error).__name__}: {error}"
