"""Q1 weight memory and speed of each quantization mode, as ratios to float32, on the CPU.

Model: a random model at SmolVLM-256M's real dimensions (``tiny_model_path("idefics3",
size="smolvlm-256m")``), loaded through ``worker.model.load`` (the worker's own path: the
per-architecture exclusions, the real-storage weight count). Speed: one greedy generate of
``TOKENS`` new tokens for one image and a prompt (prefill included), best of ``RUNS`` after a
warm-up. The seeds claim int8 "offers memory improvements up to 75 percent (if all weights are
quantized)", against float32. ``ideal_saving_pct`` is that claim's bound for this model: the
share of the float32 weight bytes in layers int8 quantizes at 1 byte a weight, the rest
(embeddings, norms, lm_head, the projector) at the load dtype.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from PIL import Image

from bench.common import QUICK, THREADS, report
from worker.tiny import tiny_model_path

TOKENS = 8 if QUICK else 16
RUNS = 1 if QUICK else 2
CONFIGS = [  # label, --quantize, --dtype
    ("float32", "none", "float32"),
    ("bfloat16", "none", "bfloat16"),
    ("int8", "int8", "float32"),
    ("int8+bfloat16", "int8", "bfloat16"),
    ("int8-bnb", "int8-bnb", "float32"),
    ("nf4-bnb+bfloat16", "nf4-bnb", "bfloat16"),
]
CLAIM = 0.75  # the seeds' "up to 75 percent" for int8


def quantized_float32_bytes(model: Any) -> int:
    """float32 bytes of the weights of every quantized layer (what the mode could shrink)."""
    names = ("QLinear", "Linear8bitLt", "Linear4bit")
    return sum(4 * m.in_features * m.out_features for m in model.modules()
               if type(m).__name__ in names)


def speed(loaded: Any) -> float:
    image = Image.new("RGB", (512, 384), (120, 160, 200))
    messages = [{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "Describe this image."}]}]
    inputs = loaded.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt").to(loaded.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    best = float("inf")
    with torch.inference_mode():
        loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        for _ in range(RUNS):
            started = time.perf_counter()
            out = loaded.model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                                        do_sample=False)
            best = min(best, time.perf_counter() - started)
    return (out.shape[1] - inputs["input_ids"].shape[1]) / best


def measure(path: str, quantize: str, dtype: str) -> dict[str, Any]:
    from worker.model import quantize as quant
    from worker.model.load import load, resolve_dtype
    from worker.settings import WorkerSettings

    cpu = torch.device("cpu")
    why = quant.unavailable(quantize, cpu, resolve_dtype(dtype, cpu))
    if why:
        return {"skipped": why}
    loaded = load(WorkerSettings(model=path, device="cpu", dtype=dtype, quantize=quantize))
    figures = {"weight_bytes": loaded.weight_bytes, "tokens_per_s": speed(loaded),
               "quantized_fp32_bytes": quantized_float32_bytes(loaded.model)}
    del loaded
    gc.collect()
    return figures


def main() -> None:
    torch.set_num_threads(THREADS)
    path = str(tiny_model_path("idefics3", size="smolvlm-256m"))
    results = {label: measure(path, q, dt) for label, q, dt in CONFIGS}
    base = results["float32"]
    rows: list[tuple[str, str]] = []
    figures: dict[str, Any] = {"model": "random SmolVLM-256M dims (idefics3), cpu",
                               "threads": THREADS, "new_tokens": TOKENS, "configs": {}}
    for label, quantize, _dtype in CONFIGS:
        got = results[label]
        if "skipped" in got:
            figures["configs"][label] = got
            rows.append((label, f"skipped: {got['skipped']}"))
            continue
        ratio = got["weight_bytes"] / base["weight_bytes"]
        entry = {"weight_mb": round(got["weight_bytes"] / 2**20, 1),
                 "weight_ratio": round(ratio, 3), "saving_pct": round(100 * (1 - ratio), 1),
                 "tokens_per_s": round(got["tokens_per_s"], 2),
                 "speed_ratio": round(got["tokens_per_s"] / base["tokens_per_s"], 3)}
        same = "bfloat16" if label.endswith("bfloat16") else "float32"
        if quantize != "none" and same == "bfloat16":
            entry["weight_ratio_to_bfloat16"] = round(
                got["weight_bytes"] / results["bfloat16"]["weight_bytes"], 3)
        if quantize == "int8":  # the claim's bound here: quantized share at 1 byte a weight,
            share = got["quantized_fp32_bytes"] / base["weight_bytes"]  # the rest at its dtype
            rest = 0.5 if same == "bfloat16" else 1.0
            entry["quantized_share_pct"] = round(100 * share, 1)
            entry["ideal_saving_pct"] = round(100 * (1 - share * (1 - CLAIM) - (1 - share) * rest),
                                              1)
        figures["configs"][label] = entry
        extra = (f", {entry['quantized_share_pct']}% of fp32 bytes quantized -> "
                 f"bound {entry['ideal_saving_pct']}%" if "ideal_saving_pct" in entry else "")
        if "weight_ratio_to_bfloat16" in entry:
            extra += f", x{entry['weight_ratio_to_bfloat16']} of bfloat16"
        rows.append((label, f"{entry['weight_mb']:>7} MB  x{entry['weight_ratio']:.3f} "
                            f"(-{entry['saving_pct']}%{extra})  "
                            f"{entry['tokens_per_s']} tok/s x{entry['speed_ratio']:.2f}"))
    rows.append(("seeds' claim", "int8 saves up to 75% of weight memory if all weights are "
                                 "quantized (vs float32)"))
    report("quant_memory", figures, rows)


if __name__ == "__main__":
    main()
