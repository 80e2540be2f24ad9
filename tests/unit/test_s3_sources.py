"""s3:// image sources: the allowlist is checked before any S3 client exists, so a refused
bucket, or a worker with no S3 source configured, never looks up credentials (the cloud metadata
service included). The metadata service is a local socket that counts who connects."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from worker.errors import ImageUrlForbidden
from worker.media import s3
from worker.media.loader import MediaLoader
from worker.settings import WorkerSettings


@pytest.fixture()
def metadata_service(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[socket.socket]:
    """A listening socket standing in for 169.254.169.254, and an environment in which boto3's
    credential chain finds nothing before it asks that service."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_EC2_METADATA_DISABLED", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{port}/")
    monkeypatch.setenv("AWS_METADATA_SERVICE_TIMEOUT", "1")
    monkeypatch.setenv("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1")
    yield listener
    listener.close()


def connections(listener: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


@pytest.mark.parametrize("allowed", [[], ["images"]], ids=["no-s3-configured", "not-allowed"])
def test_a_refused_bucket_builds_no_client_and_asks_no_metadata_service(
        allowed: list[str], metadata_service: socket.socket,
        monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Any] = []
    make_client = s3.make_client
    monkeypatch.setattr(s3, "make_client", lambda settings: built.append(settings) or
                        make_client(settings))
    loader = MediaLoader(WorkerSettings(s3_allowed_buckets=allowed))
    with pytest.raises(ImageUrlForbidden, match="not allowed"):
        loader.load("s3://secrets/key.png", max_pixels=None, deadline=time.monotonic() + 5)
    assert built == []
    assert connections(metadata_service) == 0


def test_the_spy_sees_a_credential_lookup(metadata_service: socket.socket) -> None:
    """The stand-in works: building a client with no credentials asks it."""
    s3.make_client(WorkerSettings(s3_allowed_buckets=["images"])).meta.events  # noqa: B018
    time.sleep(0.1)
    assert connections(metadata_service) >= 1
