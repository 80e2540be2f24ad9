"""Soak: many jobs from 8 producer threads, 2 workers, one SIGKILLed every few seconds.

``VLMQ_SOAK_JOBS`` sets the number of jobs (``make chaos``: 1000; default here 150, to keep
``make test`` short). Every job must end in exactly one terminal state, none lost, none
committed twice; the counts are printed (``-s`` shows them)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.cluster import Cluster
from tests.integration.soak import SOAK_JOBS, check_soak, run_soak

pytestmark = [pytest.mark.integration, pytest.mark.chaos,
              pytest.mark.timeout(300 + SOAK_JOBS)]


@pytest.fixture()
def cluster(tiny_paths: dict[str, str], image_server: Any, tmp_path: Any) -> Iterator[Cluster]:
    built = Cluster(tiny_paths["qwen2_vl"], image_server, str(tmp_path), fsync="everysec")
    yield built
    built.close()


def test_soak_sigkill_workers_redis_broker(cluster: Cluster) -> None:
    check_soak(run_soak(cluster, SOAK_JOBS), "redis broker")
