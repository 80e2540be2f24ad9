"""The supervisor's pure parts: GPU lists, each child's options and environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.ops.supervisor import (
    SupervisorError,
    child_argv,
    child_env,
    discover_gpus,
    resolve_gpus,
)
from worker.settings import WorkerSettings

SMI = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1b2c)
  MIG 1g.10gb     Device  0: (UUID: MIG-aa11)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-3d4e)
"""


def nothing() -> list[str]:
    return []


def test_nvidia_smi_listing_gives_the_gpu_indices(tmp_path: Path) -> None:
    assert discover_gpus(SMI, tmp_path / "absent") == ["0", "1"]


def test_without_nvidia_smi_the_driver_proc_entries_are_counted(tmp_path: Path) -> None:
    for bus in ("0000:17:00.0", "0000:65:00.0", "0000:ca:00.0"):
        (tmp_path / bus).mkdir()
    assert discover_gpus(None, tmp_path) == ["0", "1", "2"]
    assert discover_gpus(None, tmp_path / "absent") == []


def test_all_takes_visible_devices_first_then_discovery() -> None:
    assert resolve_gpus("all", "2,3", nothing) == ["2", "3"]
    assert resolve_gpus("all", None, lambda: ["0", "1"]) == ["0", "1"]


@pytest.mark.parametrize("visible", [None, ""])
def test_all_without_gpus_is_a_clear_error(visible: str | None) -> None:
    with pytest.raises(SupervisorError, match="no NVIDIA GPU found"):
        resolve_gpus("all", visible, nothing)


def test_explicit_lists_are_checked() -> None:
    assert resolve_gpus(" 0, 1 ", None, nothing) == ["0", "1"]
    assert resolve_gpus("GPU-1b2c", None, nothing) == ["GPU-1b2c"]
    with pytest.raises(SupervisorError, match="twice"):
        resolve_gpus("0,0", None, nothing)
    with pytest.raises(SupervisorError, match="not a GPU index"):
        resolve_gpus("0,,1", None, nothing)
    with pytest.raises(SupervisorError, match="not a GPU index"):
        resolve_gpus("cuda:0", None, nothing)


def test_child_options_replace_gpus_device_and_hostname() -> None:
    argv = ["--model", "m", "--gpus", "0,1", "--device=cuda:1", "--hostname", "w",
            "--quantize", "int8", "--gpus=all"]
    assert child_argv(argv, "cuda:0", "w", "1") == [
        "--model", "m", "--quantize", "int8", "--device", "cuda:0", "--gpus=",
        "--hostname", "w-gpu1"]
    assert child_argv(["--check"], "cpu", None, "0") == ["--check", "--device", "cpu", "--gpus="]


def test_child_environment_pins_the_gpu_and_splits_ports_and_health_files(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMQ_GPUS", "0,1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    settings = WorkerSettings(metrics_port=9000, health_file="/run/vlmq/health.json")
    env = child_env(settings, "1", 1)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "VLMQ_GPUS" not in env
    assert env["VLMQ_METRICS_PORT"] == "9001"
    assert env["VLMQ_HEALTH_FILE"] == "/run/vlmq/health.gpu1.json"
    assert "VLMQ_METRICS_PORT" not in child_env(WorkerSettings(metrics_port=0), "0", 0)
