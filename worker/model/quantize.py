"""Quantization plans: what each ``--quantize`` mode needs, what it leaves alone, and whether it
can run here. Builds no transformers config itself (``worker.model.load`` does, from the plan).

Modes: ``none``; ``int8`` (optimum-quanto weight-only int8, transformers ``QuantoConfig``);
``int8-bnb`` and ``nf4-bnb`` (bitsandbytes LLM.int8() and 4-bit NF4, ``BitsAndBytesConfig``).

Modules kept in the model dtype, by ``model_type`` (full module names, matched as prefixes; a
list replaces transformers' default one, so ``lm_head`` is always listed again):

- ``lm_head`` (every mode): the output projection decides every token; it stays exact.
- the vision-to-text projector (every mode): small, and the one place where the two towers'
  scales meet. LLaVA's ``model.multi_modal_projector`` must be excluded for quanto in
  bfloat16: its input is not contiguous and quanto's CPU int8 kernel refuses it.
- the vision tower (``nf4-bnb`` only): 4-bit vision encoders lose detail noticeably, while
  int8 per-channel weights are near-lossless, and the tower is a large share of a small VLM
  (36% of SmolVLM-256M), so int8 modes quantize it.
- IDEFICS (v1) (every mode): the vision tower, the perceiver resampler and the gated
  cross-attention blocks, where the images enter the language model. They are its
  projector's counterpart, and a small share of the 9B/80B models (the LLaMA decoder, which is
  quantized, holds most of the weights), so the vision tower is kept in int8 modes too.

An unknown ``model_type`` gets transformers' default exclusions (the output embedding) and a
warning. ``unavailable`` runs a tiny probe layer of the chosen mode on the chosen device, so a
combination that cannot run fails at start with the reason, not at the first job.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("vlmq.quantize")

MODES = ("none", "int8", "int8-bnb", "nf4-bnb")
HEAD = ["lm_head"]
PROJECTORS: dict[str, list[str]] = {
    "idefics3": ["model.connector"],
    "smolvlm": ["model.connector"],
    "llava": ["model.multi_modal_projector"],
    "qwen2_vl": ["model.visual.merger"],
    "qwen2_5_vl": ["model.visual.merger"],
    "qwen3_vl": ["model.visual.merger", "model.visual.deepstack_merger_list"],
    "idefics": ["model.vision_model", "model.perceiver_resampler", "model.gated_cross_attn_layers"],
}
VISION_TOWERS: dict[str, list[str]] = {
    "idefics3": ["model.vision_model"],
    "smolvlm": ["model.vision_model"],
    "llava": ["model.vision_tower"],
    "qwen2_vl": ["model.visual"],
    "qwen2_5_vl": ["model.visual"],
    "qwen3_vl": ["model.visual"],
    "idefics": ["model.vision_model"],
}
INSTALL = {
    "int8": "optimum-quanto (pip install 'vlmq[worker]' or optimum-quanto>=0.2.6)",
    "int8-bnb": "bitsandbytes (pip install 'vlmq[gpu]' or bitsandbytes>=0.45)",
    "nf4-bnb": "bitsandbytes (pip install 'vlmq[gpu]' or bitsandbytes>=0.45)",
}
LIBRARY = {"int8": "optimum.quanto", "int8-bnb": "bitsandbytes", "nf4-bnb": "bitsandbytes"}


@dataclass(frozen=True)
class Plan:
    """What to hand transformers for one mode and one architecture."""

    mode: str
    library: str | None  # "quanto", "bnb" or None
    skip: list[str] | None  # modules kept unquantized; None = transformers' default

    @property
    def quantized(self) -> bool:
        return self.library is not None


def excluded_modules(mode: str, model_type: str) -> list[str] | None:
    """Full module names to keep in the model dtype for ``mode`` on ``model_type``."""
    if model_type not in PROJECTORS:
        log.warning("no exclusion list for model_type %r: quantizing every Linear layer but "
                    "the output embedding", model_type)
        return None
    skip = HEAD + PROJECTORS[model_type]
    if mode == "nf4-bnb":
        skip += [tower for tower in VISION_TOWERS[model_type] if tower not in skip]
    return skip


def plan(mode: str, model_type: str) -> Plan:
    if mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; expected one of {MODES}")
    if mode == "none":
        return Plan(mode, None, None)
    library = "quanto" if mode == "int8" else "bnb"
    return Plan(mode, library, excluded_modules(mode, model_type))


def unavailable(mode: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``mode`` cannot run on ``device`` in ``dtype`` here, or None when it can.

    Imports the library and runs one small quantized layer forward on the device.
    """
    if mode == "none":
        return None
    if mode not in MODES:
        return f"unknown quantize mode {mode!r}; expected one of {', '.join(MODES)}"
    try:
        importlib.import_module(LIBRARY[mode])
    except Exception as error:  # ImportError, or a broken native library raising anything
        return (f"quantize={mode} needs {INSTALL[mode]}, which cannot be imported here "
                f"({type(error).__name__}: {error})")
    try:
        with torch.inference_mode():
            out = _probe(mode, device, dtype)
    except Exception as error:
        return (f"quantize={mode} cannot run on {device} with dtype "
                f"{str(dtype).removeprefix('torch.')}: a probe layer failed "
                f"({type(error).__name__}: {str(error).strip().splitlines()[0][:300]})")
    if not bool(torch.isfinite(out).all()):
        return f"quantize={mode} gives non-finite values on {device} (probe layer)"
    return None


def _probe(mode: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 64, generator=gen).to(device=device, dtype=dtype)
    if mode == "int8":
        from optimum.quanto import freeze, qint8
        from optimum.quanto import quantize as quanto_quantize

        layer = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)).to(device, dtype)
        quanto_quantize(layer, weights=qint8)
        freeze(layer)
        return layer(inputs)
    import bitsandbytes as bnb

    bnb_layer: torch.nn.Module
    if mode == "int8-bnb":
        bnb_layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
    else:
        bnb_layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
    return bnb_layer.to(device)(inputs)  # moving to the device quantizes the weight


def quantized_modules(model: torch.nn.Module) -> int:
    """How many modules hold quantized weights (quanto QLinear, bnb Linear8bitLt/Linear4bit)."""
    names = ("QLinear", "QConv2d", "Linear8bitLt", "Linear4bit")
    return sum(1 for module in model.modules() if type(module).__name__ in names)
