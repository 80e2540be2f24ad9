"""Quantized loading for every tiny architecture, its true weight memory, and start-up refusals.

Models load through ``worker.model.load`` (the worker's path) on the CPU and generate with
``worker.check.smoke_generate``. Weight memory is checked exactly: each quantized layer's
weight must shrink from ``out*in*esize`` bytes to ``out*in`` int8 bytes plus its per-row scale.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import pytest
import torch
from transformers.models.idefics.modeling_idefics import IdeficsDecoupledLinear

from tests.conftest import ARCHS
from tests.servers import WorkerProcess
from worker.model import quantize
from worker.model.check import smoke_generate
from worker.model.load import LoadedModel, load
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration
CPU = torch.device("cpu")
BNB_WHY = quantize.unavailable("int8-bnb", CPU, torch.float32)
NF4_WHY = quantize.unavailable("nf4-bnb", CPU, torch.bfloat16)


def load_tiny(arch: str, quantize_mode: str = "none", dtype: str = "float32") -> LoadedModel:
    from worker.tiny import tiny_model_path

    return load(WorkerSettings(model=str(tiny_model_path(arch)), device="cpu", dtype=dtype,
                               quantize=quantize_mode))


@cache
def baseline_bytes(arch: str, dtype: str) -> int:
    return load_tiny(arch, "none", dtype).weight_bytes


def layers(model: Any, kind: str) -> list[tuple[str, Any]]:
    return [(name, module) for name, module in model.named_modules()
            if type(module).__name__ == kind]


def assert_kept(loaded: LoadedModel, arch: str, mode: str) -> None:
    """The plan's excluded modules are still plain torch Linear layers; the rest quantized."""
    skip = quantize.plan(mode, loaded.model.config.model_type).skip or []
    plain = (torch.nn.Linear, IdeficsDecoupledLinear)  # IDEFICS' lm_head: a Linear subclass
    linears = [name for name, m in loaded.model.named_modules() if type(m) in plain]
    assert "lm_head" in linears
    for name in linears:
        assert any(name == s or name.startswith(s + ".") for s in skip), f"{arch}: {name}"
    assert loaded.quantized_modules > 0


def generates(loaded: LoadedModel) -> None:
    report = smoke_generate(loaded)
    assert report["check_tokens"] >= 1 and report["tokens_per_s"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", [*ARCHS, "idefics"])
def test_quanto_int8_loads_generates_and_holds_int8_weights(arch: str, dtype: str) -> None:
    loaded = load_tiny(arch, "int8", dtype)
    generates(loaded)
    assert_kept(loaded, arch, "int8")
    esize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    saved = 0
    for _name, module in layers(loaded.model, "QLinear"):
        rows, cols = module.out_features, module.in_features
        # dtype weight -> int8 weight + one scale per output row, plus quanto's two scalar
        # float32 activation-scale buffers
        saved += rows * cols * (esize - 1) - rows * esize - 2 * 4
    assert loaded.weight_bytes == baseline_bytes(arch, dtype) - saved
    assert loaded.weight_bytes < baseline_bytes(arch, dtype)


@pytest.mark.skipif(BNB_WHY is not None, reason=f"bitsandbytes 8-bit cannot run here: {BNB_WHY}")
@pytest.mark.parametrize("arch", [*ARCHS, "idefics"])
def test_bnb_int8_loads_generates_and_holds_int8_weights(arch: str) -> None:
    loaded = load_tiny(arch, "int8-bnb", "float32")
    generates(loaded)
    assert_kept(loaded, arch, "int8-bnb")
    saved = sum(m.out_features * m.in_features * 3 - m.out_features * 4  # int8 + float32 SCB
                for _name, m in layers(loaded.model, "Linear8bitLt"))
    assert loaded.weight_bytes == baseline_bytes(arch, "float32") - saved


@pytest.mark.skipif(NF4_WHY is not None, reason=f"bitsandbytes 4-bit cannot run here: {NF4_WHY}")
@pytest.mark.parametrize("arch", ["llava", "qwen3_vl"])
def test_bnb_nf4_loads_generates_and_leaves_the_vision_tower(arch: str) -> None:
    loaded = load_tiny(arch, "nf4-bnb", "bfloat16")
    generates(loaded)
    assert_kept(loaded, arch, "nf4-bnb")
    towers = quantize.VISION_TOWERS[loaded.model.config.model_type]
    assert not [n for n, _m in layers(loaded.model, "Linear4bit") if n.startswith(tuple(towers))]
    assert loaded.weight_bytes < baseline_bytes(arch, "bfloat16")


def test_worker_serves_int8_jobs_end_to_end(redis_server: Any, image_server: Any,
                                           tiny_paths: dict[str, str], producer: Any,
                                           tmp_path: Any) -> None:
    worker = WorkerProcess(tiny_paths["idefics3"], redis_server.url, name="int8-idefics3",
                           image_port=image_server.port, log_dir=str(tmp_path),
                           env={"VLMQ_QUANTIZE": "int8"})
    try:
        worker.wait_ready()
        job_id = producer.submit(prompt="What is it?", images=[image_server.url("/cats.png")],
                                 model="int8-idefics3", max_new_tokens=6)
        result = producer.result(job_id, timeout=120)
        assert result.usage.completion_tokens >= 1
        assert producer.status(job_id).status == "SUCCEEDED"
        assert "quantize=int8" in worker.log()  # the model-ready line's fields
    finally:
        worker.stop()


def run_check(*args: str, hide: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m worker --check ARGS`` in a fresh process; ``hide`` makes a module
    unimportable there (as if it were not installed)."""
    code = ("import runpy, sys\n"
            f"if {hide!r}: sys.modules[{hide!r}] = None\n"
            "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", code, "--check", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=300)


REFUSALS = [
    ("flash-attn missing", ["--attn", "flash_attention_2"], None,
     ["flash_attention_2", "flash-attn is not installed"]),
    ("bitsandbytes cannot run nf4", ["--quantize", "nf4-bnb"], "bitsandbytes",
     ["quantize=nf4-bnb needs bitsandbytes", "cannot be imported"]),
    ("quanto missing", ["--quantize", "int8"], "optimum.quanto",
     ["quantize=int8 needs optimum-quanto", "cannot be imported"]),
    ("unknown model path", ["--model", "/nonexistent/vlm"], None,
     ["/nonexistent/vlm", "no such directory"]),
    ("unknown hub id offline", ["--model", "no-such-org/no-such-vlm"], None,
     ["cannot load model 'no-such-org/no-such-vlm'"]),
]


@pytest.fixture()
def worker_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                ) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``vlmq-worker ARGS`` in this process (``worker.cli.main``): exit code, stdout, stderr;
    ``hide`` makes a module unimportable (as if it were not installed). The root logger the
    worker's log setup takes over is given back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def run(*args: str, hide: str | None = None) -> tuple[int, str, str]:
        from worker.cli import main

        if hide:
            monkeypatch.setitem(sys.modules, hide, None)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def assert_refused(case: str, code: int, out: str, err: str, needles: list[str]) -> None:
    assert code == 2, f"{case}: {code}\n{err[-2000:]}"
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert "vlmq-worker: cannot start:" in err, case
    for needle in needles:
        assert needle in err, f"{case}: {needle!r} not in {last!r}"
    assert out == ""


def test_check_reports_what_it_loaded(tiny_paths: dict[str, str], worker_main: Any) -> None:
    """``--check`` in this process (test_supervisor runs it in child processes, one per GPU)."""
    code, out, err = worker_main("--check", "--device", "cpu", "--model", tiny_paths["llava"],
                                 "--quantize", "int8", "--dtype", "bfloat16", "--attn", "eager")
    assert code == 0, err
    report = json.loads(out)
    assert report["device"] == "cpu" and report["dtype"] == "bfloat16"
    assert report["attention"] == "eager" and report["quantize"] == "int8"
    assert report["quantized_modules"] > 0 and report["weight_mb"] > 0
    assert report["load_s"] > 0 and report["tokens_per_s"] > 0 and report["rss_mb"] > 0


@pytest.mark.parametrize("case,args,hide,needles", REFUSALS)
def test_startup_refusals_exit_2_with_the_reason(tiny_paths: dict[str, str], case: str,
                                                 args: list[str], hide: str | None,
                                                 needles: list[str], worker_main: Any) -> None:
    base = [] if "--model" in args else ["--model", tiny_paths["qwen2_vl"]]
    code, out, err = worker_main("--check", "--device", "cpu", *base, *args, hide=hide)
    assert_refused(case, code, out, err, needles)


def test_a_worker_process_refused_at_start_exits_2_with_the_reason(
        tiny_paths: dict[str, str]) -> None:
    """The refusals above, end to end once: ``python -m worker`` in a process of its own, with a
    module that cannot be imported there."""
    case, args, hide, needles = REFUSALS[2]
    done = run_check("--model", tiny_paths["qwen2_vl"], *args, hide=hide)
    assert_refused(case, done.returncode, done.stdout, done.stderr, needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA GPU")
def test_cuda_device_without_a_gpu_is_refused(tiny_paths: dict[str, str],
                                              worker_main: Any) -> None:
    code, _out, err = worker_main("--check", "--model", tiny_paths["qwen2_vl"], "--device",
                                  "cuda:0")
    assert code == 2 and "no CUDA GPU is available" in err
