"""`vlmq-worker --gpus`: one pinned, supervised worker per GPU, and memory recycling.

There is no GPU here: ``VLMQ_SUPERVISOR_CHILD_DEVICE=cpu`` (for tests only) runs the children on
the CPU, so each child's CUDA_VISIBLE_DEVICES is checked in its real environment
(/proc/<pid>/environ) rather than through a GPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.servers import WorkerProcess, free_port
from tests.waiting import eventually
from worker.model.memory import RECYCLE_EXIT

pytestmark = pytest.mark.integration
STARTED = re.compile(r"child gpu=(\S+) pid=(\d+) started \(CUDA_VISIBLE_DEVICES=(\S+)\)")


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text(errors="replace")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Supervised:
    """``python -m worker --gpus ...`` with its log file."""

    def __init__(self, model: str, redis_url: str, tmp: Path, *args: str, **env: str) -> None:
        self.log_path = tmp / "supervisor.log"
        full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                        VLMQ_MODEL=model, VLMQ_MODEL_NAME="tiny-gpus", VLMQ_REDIS_URL=redis_url,
                        VLMQ_QUEUE="q-tiny-gpus", VLMQ_SUPERVISOR_CHILD_DEVICE="cpu",
                        VLMQ_METRICS_PORT=str(free_port()), VLMQ_METRICS_ADDR="127.0.0.1",
                        VLMQ_HEALTH_FILE=str(tmp / "health.json"), VLMQ_STOP_GRACE_S="60",
                        OMP_NUM_THREADS="1", **env)
        full_env.pop("CUDA_VISIBLE_DEVICES", None)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", *args], env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[tuple[str, int, str]]:
        return [(gpu, int(pid), visible) for gpu, pid, visible in STARTED.findall(self.log())]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        for _gpu, pid, _visible in self.children():
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def test_gpus_runs_one_pinned_worker_per_gpu_restarts_the_dead_and_stops_on_sigterm(
        redis_server: Any, image_server: Any, tiny_paths: dict[str, str], producer: Any,
        tmp_path: Path) -> None:
    sup = Supervised(tiny_paths["qwen2_vl"], redis_server.url, tmp_path, "--gpus", "0,1",
                     VLMQ_ALLOW_PRIVATE_ADDRESSES="true",
                     VLMQ_ALLOWED_PORTS=f"80,443,{image_server.port}")
    try:
        eventually(lambda: sup.log().count("vlmq-worker: ready") >= 2, timeout=180,
                   what="two children ready")
        first = sup.children()
        assert sorted((gpu, visible) for gpu, _pid, visible in first) == [("0", "0"), ("1", "1")]
        for gpu, pid, _visible in first:  # pinned in the child's real environment
            env = environ(pid)
            assert env["CUDA_VISIBLE_DEVICES"] == gpu and "VLMQ_GPUS" not in env
            assert maps_torch(pid)
        assert not maps_torch(sup.proc.pid), "the supervisor must not load torch"

        jobs = [producer.submit(prompt=f"What is it? {i}", images=[image_server.url("/cats.png")],
                                model="tiny-gpus", max_new_tokens=4) for i in range(4)]
        for job_id in jobs:
            producer.result(job_id, timeout=120)
            assert producer.status(job_id).status == "SUCCEEDED"

        victim = next(pid for gpu, pid, _v in first if gpu == "0")
        os.kill(victim, signal.SIGKILL)
        again = eventually(lambda: [c for c in sup.children() if c[0] == "0" and c[1] != victim],
                           timeout=180, what="child on gpu 0 restarted")
        assert f"pid={victim} exited with signal SIGKILL" in sup.log()
        assert environ(again[0][1])["CUDA_VISIBLE_DEVICES"] == "0"
        eventually(lambda: sup.log().count("vlmq-worker: ready") >= 3, timeout=180,
                   what="restarted child ready")

        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(120) == 0
        assert all(gone(pid) for _gpu, pid, _v in sup.children())
        assert "all children stopped" in sup.log()
    finally:
        sup.stop()


def test_gpus_check_runs_the_check_on_every_gpu(tiny_paths: dict[str, str], redis_server: Any,
                                                tmp_path: Path) -> None:
    sup = Supervised(tiny_paths["llava"], redis_server.url, tmp_path, "--gpus", "0,1", "--check")
    try:
        assert sup.proc.wait(300) == 0, sup.log()[-3000:]
        text = sup.log()
        report = json.loads(text[text.index('{\n  "gpus"'):text.rindex("}") + 1])["gpus"]
        assert {gpu: r["cuda_visible_devices"] for gpu, r in report.items()} == {"0": "0",
                                                                                 "1": "1"}
        assert all(r["exit"] == 0 and r["check_tokens"] >= 1 for r in report.values())
    finally:
        sup.stop()


@pytest.mark.skipif(bool(shutil.which("nvidia-smi")) or Path("/proc/driver/nvidia/gpus").exists(),
                    reason="this host has NVIDIA GPUs")
def test_gpus_all_without_gpus_is_refused(redis_server: Any, tiny_paths: dict[str, str],
                                          tmp_path: Path) -> None:
    sup = Supervised(tiny_paths["llava"], redis_server.url, tmp_path, "--gpus", "all")
    try:
        assert sup.proc.wait(120) == 2
        assert "cannot start: --gpus all: no NVIDIA GPU found" in sup.log()
    finally:
        sup.stop()


def test_worker_over_its_rss_watermark_recycles_itself(redis_server: Any, image_server: Any,
                                                       tiny_paths: dict[str, str],
                                                       tmp_path: Path) -> None:
    worker = WorkerProcess(tiny_paths["llava"], redis_server.url, name="tiny-recycle",
                           image_port=image_server.port, log_dir=str(tmp_path),
                           env={"VLMQ_MAX_RSS_MB": "64", "VLMQ_LEASE_S": "3"})
    try:
        assert worker.proc.wait(180) == RECYCLE_EXIT, worker.log()[-3000:]
        log = worker.log()
        assert "vlmq-worker: ready" in log
        assert "recycling this worker: host RSS" in log and "VLMQ_MAX_RSS_MB=64" in log
    finally:
        worker.stop()
