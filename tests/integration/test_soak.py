"""Soak: many jobs from 8 producer threads, 2 workers, one SIGKILLed every few seconds.

``VLMQ_SOAK_JOBS`` sets the number of jobs (``make chaos``: 2000; default here 150, to keep
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


@pytest.fixture()
def chaos_cluster(tiny_paths: dict[str, str], image_server: Any,
                  tmp_path: Any) -> Iterator[Cluster]:
    built = Cluster(tiny_paths["qwen2_vl"], image_server, str(tmp_path), fsync="always",
                    proxied=True)
    yield built
    built.close()


def test_chaos_redis_killed_paused_connections_reset_workers_stopped(
        chaos_cluster: Cluster) -> None:
    """The soak, plus one fault every 2 s in turn (soak.FAULTS): Redis SIGKILLed and restarted
    (AOF always), every worker connection reset at the proxy, Redis paused, a worker stopped
    past its lease. The same invariants, and no worker process dies of it."""
    report = run_soak(chaos_cluster, SOAK_JOBS, fault_every=2.0)
    check_soak(report, "chaos, redis broker")
    assert sum(report.faults.values()) > 0
