"""Loading the model and processor, once per worker process. The only transformers import.

``load`` resolves device, dtype, attention and quantization (``worker.model.quantize``: what to keep
unquantized per architecture, and a probe that the mode runs on the device) from the settings,
refusing at start (StartupError) what cannot run, loads
``AutoModelForImageTextToText`` + ``AutoProcessor`` (hub id or local path) and reports what it
got. ``StepHook`` adapts the engine's per-step callback to transformers' StoppingCriteria.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    QuantoConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from worker.model import quantize
from worker.model.memory import gpu_memory
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
    quantized_modules: int = 0

    def describe(self) -> dict[str, Any]:
        """What was loaded, how, and the memory it holds (GPU figures only on CUDA)."""
        report: dict[str, Any] = {
            "model": self.model_id,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.attn,
            "quantize": self.quantize,
            "quantized_modules": self.quantized_modules,
            "load_s": round(self.load_s, 3),
            "weight_mb": round(self.weight_bytes / 2**20, 2),
        }
        if self.device.type == "cuda":
            report |= gpu_memory(self.device.index or 0)
        return report


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StartupError(f"device {name!r} asked for, but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise StartupError(f"unsupported device {name!r}: use auto, cpu or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise StartupError(f"device {name!r} asked for, but only {torch.cuda.device_count()} "
                           "CUDA GPU(s) are visible to this process (CUDA_VISIBLE_DEVICES "
                           "renumbers them from cuda:0)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def resolve_attention(name: str, device: torch.device,
                      dtype: torch.dtype | None = None) -> str:
    """The attention implementation to load with; StartupError when ``name`` cannot run."""
    half = dtype in (None, torch.float16, torch.bfloat16)
    flash_ok = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if flash_ok:
        major, _minor = torch.cuda.get_device_capability(device)
        flash_ok = major >= 8
    if name == "auto":
        return "flash_attention_2" if flash_ok and half else "sdpa"
    if name == "flash_attention_2" and not flash_ok:
        why = ("flash-attn is not installed (pip install 'vlmq[gpu]')"
               if importlib.util.find_spec("flash_attn") is None
               else "it needs a CUDA GPU of compute capability 8.0 or newer")
        raise StartupError(f"attention flash_attention_2 cannot run on {device}: {why}")
    if name == "flash_attention_2" and not half:
        raise StartupError("attention flash_attention_2 needs dtype float16 or bfloat16, got "
                           f"{str(dtype).removeprefix('torch.')} (use --dtype bfloat16)")
    return name


def _storage_bytes(tensor: torch.Tensor, seen: set[int]) -> int:
    """Bytes of ``tensor``'s real storage, each storage counted once (``seen``).

    Wrapper tensor subclasses (optimum-quanto QTensors: int8 ``_data`` plus ``_scale``) report
    the dtype they dequantize to and have no storage of their own: their inner tensors are
    counted instead. bitsandbytes parameters hold their packed bytes, plus quantization state
    beside them (``SCB`` for 8-bit; ``quant_state.absmax``/``code``, nested, for 4-bit).
    """
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        inner_names, _context = flatten()
        return sum(_storage_bytes(getattr(tensor, name), seen) for name in inner_names)
    total = 0
    if tensor.device.type == "meta":
        total = tensor.numel() * tensor.element_size()
    else:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen:
            seen.add(key)
            total = storage.nbytes()
    for name in ("SCB", "CB"):
        extra = getattr(tensor, name, None)
        if isinstance(extra, torch.Tensor):
            total += _storage_bytes(extra, seen)
    state = getattr(tensor, "quant_state", None)
    while state is not None:
        for name in ("absmax", "code", "offset"):
            extra = getattr(state, name, None)
            if isinstance(extra, torch.Tensor):
                total += _storage_bytes(extra, seen)
        state = getattr(state, "state2", None)
    return total


def weight_bytes(model: Any) -> int:
    """Bytes held by parameters and buffers, counting each tensor's real storage."""
    seen: set[int] = set()
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(_storage_bytes(tensor, seen) for tensor in tensors)


def _quantization_config(plan: quantize.Plan, dtype: torch.dtype) -> Any:
    if plan.library == "quanto":
        return QuantoConfig(weights="int8", modules_to_not_convert=plan.skip)
    if plan.mode == "int8-bnb":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=plan.skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=plan.skip)


def _check_path(model: str) -> None:
    looks_local = model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()
    if looks_local and not Path(model).expanduser().is_dir():
        raise StartupError(f"cannot load model {model!r}: no such directory")


def load(settings: WorkerSettings) -> LoadedModel:
    """Load the model and processor the settings ask for, or raise StartupError."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    attn = resolve_attention(settings.attn, device, dtype)
    reason = quantize.unavailable(settings.quantize, device, dtype)
    if reason:
        raise StartupError(reason)
    _check_path(settings.model)
    hf_logging.disable_progress_bar()
    log.info("loading model %s", settings.model, extra={"fields": {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "attention": attn,
        "quantize": settings.quantize}})
    started = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(settings.model)
        plan = quantize.plan(settings.quantize, config.model_type)
        extra: dict[str, Any] = {}
        if plan.quantized:
            extra["quantization_config"] = _quantization_config(plan, dtype)
        processor = AutoProcessor.from_pretrained(settings.model)
        model = AutoModelForImageTextToText.from_pretrained(
            settings.model, config=config, dtype=dtype, attn_implementation=attn,
            device_map={"": device}, **extra)
    except (OSError, ValueError, ImportError, TypeError) as error:
        how = "" if settings.quantize == "none" else f" with quantize={settings.quantize}"
        raise StartupError(f"cannot load model {settings.model!r}{how}: {error}") from error
    model.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    loaded = LoadedModel(
        model=model, processor=processor, model_id=settings.served_model(), device=device,
        dtype=dtype, attn=str(getattr(model.config, "_attn_implementation", None) or attn),
        quantize=settings.quantize, load_s=time.perf_counter() - started,
        weight_bytes=weight_bytes(model), quantized_modules=quantize.quantized_modules(model))
    if plan.quantized:
        log.info("quantize=%s kept unquantized: %s", plan.mode,
                 ", ".join(plan.skip) if plan.skip else "transformers' default (output embedding)")
    if plan.mode == "int8-bnb" and dtype == torch.float32:  # else one warning per matmul
        log.info("int8-bnb: bitsandbytes casts float32 activations to float16 for its 8-bit "
                 "matmuls (float16 or bfloat16 dtypes avoid the cast)")
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    log.info("model ready", extra={"fields": loaded.describe()})
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
