"""`vlmq-worker --check`: one tiny generation with the loaded model, timed.

The report adds tokens/s, the process RSS and, on CUDA, the allocated / reserved GPU memory after
the generation to what ``LoadedModel.describe`` says (device, dtype, attention, quantization,
weight memory, load time)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from PIL import Image

from producer.schema import JobRequest
from worker.engine.prompts import encode
from worker.model.load import LoadedModel
from worker.model.memory import MB, gpu_memory, rss_bytes

CHECK_TOKENS = 16


def smoke_generate(loaded: LoadedModel) -> dict[str, Any]:
    """Generate a few tokens for a small synthetic image; report tokens/s."""
    image = Image.new("RGB", (64, 48), (120, 160, 200))
    request = JobRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "image", "image": "data:image/png;base64,AA=="},
        {"type": "text", "text": "Describe this image."}]}]})
    # the engine's own prompt path for this architecture (chat template, or IDEFICS' prompt)
    inputs = encode(loaded.processor, request, [image], None, 1 << 20).to(loaded.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=CHECK_TOKENS, do_sample=False)
    seconds = time.perf_counter() - started
    new = int(out.shape[1] - inputs["input_ids"].shape[1])
    report: dict[str, Any] = {"check_tokens": new,
                              "tokens_per_s": round(new / seconds, 1) if seconds else None}
    report["rss_mb"] = round(rss_bytes() / MB, 1)
    report["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    if loaded.device.type == "cuda":  # after the generation: what serving will hold
        report |= gpu_memory(loaded.device.index or 0)
    return report
