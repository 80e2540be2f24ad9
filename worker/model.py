"""Loading the model and processor, once per worker process. The only transformers import.

``load`` resolves device, dtype and attention from the settings, loads
``AutoModelForImageTextToText`` + ``AutoProcessor`` (hub id or local path) and reports what it
got. ``StepHook`` adapts the engine's per-step callback to transformers' StoppingCriteria.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from worker.settings import WorkerSettings

log = logging.getLogger("vlmq.model")


class StartupError(RuntimeError):
    """The worker cannot serve with these settings; the message says why."""


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    model_id: str
    device: torch.device
    dtype: torch.dtype
    attn: str
    quantize: str
    load_s: float
    weight_bytes: int

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.attn,
            "quantize": self.quantize,
            "load_s": round(self.load_s, 3),
            "weight_mb": round(self.weight_bytes / 2**20, 2),
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StartupError(f"device {name!r} asked for, but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise StartupError(f"unsupported device {name!r}: use auto, cpu or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def resolve_attention(name: str, device: torch.device) -> str:
    flash_ok = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if flash_ok:
        major, _minor = torch.cuda.get_device_capability(device)
        flash_ok = major >= 8
    if name == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if name == "flash_attention_2" and not flash_ok:
        why = ("flash-attn is not installed (pip install 'vlmq[gpu]')"
               if importlib.util.find_spec("flash_attn") is None
               else "it needs a CUDA GPU of compute capability 8.0 or newer")
        raise StartupError(f"attention flash_attention_2 cannot run on {device}: {why}")
    return name


def weight_bytes(model: Any) -> int:
    """Bytes held by parameters and buffers, counting each tensor's real storage."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def load(settings: WorkerSettings) -> LoadedModel:
    """Load the model and processor the settings ask for, or raise StartupError."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    attn = resolve_attention(settings.attn, device)
    if settings.quantize != "none":
        raise StartupError(f"quantize={settings.quantize!r} is not supported by this build")
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    try:
        processor = AutoProcessor.from_pretrained(settings.model)
        model = AutoModelForImageTextToText.from_pretrained(
            settings.model, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as error:
        raise StartupError(f"cannot load model {settings.model!r}: {error}") from error
    model = model.to(device).eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    loaded = LoadedModel(
        model=model, processor=processor, model_id=settings.served_model(), device=device,
        dtype=dtype, attn=attn, quantize=settings.quantize,
        load_s=time.perf_counter() - started, weight_bytes=weight_bytes(model))
    log.info("model ready %s", loaded.describe())
    return loaded


class StepHook(StoppingCriteria):
    """Calls ``callback(input_ids)`` after every decode step; it returns a per-row done mask."""

    def __init__(self, callback: Callable[[torch.LongTensor], torch.BoolTensor]) -> None:
        self.callback = callback

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        return self.callback(input_ids)


def stopping(callback: Callable[[torch.LongTensor], torch.BoolTensor]) -> StoppingCriteriaList:
    return StoppingCriteriaList([StepHook(callback)])
