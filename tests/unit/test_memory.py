"""Watermarks, sticky CUDA errors and the quantization plans (no model loaded)."""

from __future__ import annotations

import pytest
import torch

from worker.model import quantize
from worker.model.memory import MB, is_sticky_cuda_error, over_watermark, rss_bytes
from worker.settings import WorkerSettings

STICKY = [
    "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
    "asynchronously reported at some other API call",
    "CUDA error: unspecified launch failure",
    "CUDA error: device-side assert triggered",
    "CUDA error: misaligned address",
    "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, m, n, k)`",
]
NOT_STICKY = [
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "Expected all tensors to be on the same device, but found cuda:0 and cpu",
    "the prompt mentions an illegal memory access",  # not from CUDA
    "shape '[2, 64]' is invalid for input of size 100",
]


@pytest.mark.parametrize("message", STICKY)
def test_sticky_cuda_errors_are_recognised(message: str) -> None:
    assert is_sticky_cuda_error(RuntimeError(message))
    assert is_sticky_cuda_error(torch.AcceleratorError(message))


@pytest.mark.parametrize("message", NOT_STICKY)
def test_other_errors_are_not_sticky(message: str) -> None:
    assert not is_sticky_cuda_error(RuntimeError(message))


def test_out_of_memory_is_never_sticky() -> None:
    assert not is_sticky_cuda_error(torch.OutOfMemoryError("CUDA error: out of memory"))


def test_a_sticky_cause_is_found_through_the_chain() -> None:
    try:
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as inner:
            raise ValueError("generation failed") from inner
    except ValueError as outer:
        assert is_sticky_cuda_error(outer)


def test_rss_watermark() -> None:
    rss_mb = rss_bytes() / MB
    assert rss_mb > 10
    assert over_watermark(WorkerSettings(max_rss_mb=0)) is None
    assert over_watermark(WorkerSettings(max_rss_mb=int(rss_mb * 4) + 1000)) is None
    reason = over_watermark(WorkerSettings(max_rss_mb=1))
    assert reason is not None and "VLMQ_MAX_RSS_MB=1" in reason


def test_gpu_watermark_is_silent_off_cuda() -> None:
    assert over_watermark(WorkerSettings(device="cpu", max_gpu_reserved_mb=1)) is None


@pytest.mark.parametrize("model_type,projector", [
    ("idefics3", "model.connector"), ("llava", "model.multi_modal_projector"),
    ("qwen2_vl", "model.visual.merger"), ("qwen2_5_vl", "model.visual.merger"),
    ("qwen3_vl", "model.visual.deepstack_merger_list")])
def test_plans_keep_head_and_projector_and_nf4_keeps_the_vision_tower(
        model_type: str, projector: str) -> None:
    for mode in ("int8", "int8-bnb", "nf4-bnb"):
        skip = quantize.plan(mode, model_type).skip
        assert skip is not None and "lm_head" in skip and projector in skip
    tower = quantize.VISION_TOWERS[model_type][0]
    assert tower in (quantize.plan("nf4-bnb", model_type).skip or [])
    assert tower not in (quantize.plan("int8", model_type).skip or [])
    assert quantize.plan("int8", model_type).library == "quanto"
    assert quantize.plan("nf4-bnb", model_type).library == "bnb"
    assert not quantize.plan("none", model_type).quantized


def test_idefics_keeps_vision_perceiver_and_cross_attention_in_every_mode() -> None:
    kept = ["model.vision_model", "model.perceiver_resampler", "model.gated_cross_attn_layers"]
    for mode in ("int8", "int8-bnb", "nf4-bnb"):
        skip = quantize.plan(mode, "idefics").skip
        assert skip is not None and set(skip) == {"lm_head", *kept} and len(skip) == 4


def test_unknown_architectures_get_transformers_defaults() -> None:
    assert quantize.plan("int8", "some_new_vlm").skip is None
