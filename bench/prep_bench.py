"""Preparing requests beside a decode loop: the engine's prep threads vs a process pool.

The engine prepares each request (``worker.engine.prompts.encode``: chat template, image
processor, tokenizer) on a pool of threads while its generation thread decodes, so the two
share the GIL. This measures the alternative, a process pool (the processor loaded once per
process, images pickled there, tensors back through shared memory), on the tiny idefics3 model:
per repeat, 8 requests (one image each, 64-176 px) are prepared while a batched ``generate``
(8 rows x 32 tokens, torch pinned to 1 thread) runs in this process. Prints the time until all
8 are prepared and the generate's time beside generate alone, for: 2 threads (what the engine
runs), 4 threads, 1 and 2 processes.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from bench.common import PROMPTS, make_image, report
from worker.tiny import tiny_model_path

REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
SIZE, TOKENS = 8, 32
_processor: Any = None  # per process pool worker


def _load(path: str) -> None:
    global _processor
    import torch
    from transformers import AutoProcessor

    torch.set_num_threads(1)
    _processor = AutoProcessor.from_pretrained(path)


def _encode(path: str, request: Any, images: list[Any]) -> dict[str, Any]:
    from worker.engine.prompts import encode

    if _processor is None:
        _load(path)
    return dict(encode(_processor, request, images, None, 100_000))


def workload() -> list[tuple[Any, list[Any]]]:
    import io

    from PIL import Image

    from producer.schema import JobRequest

    out = []
    for i in range(SIZE):
        image = Image.open(io.BytesIO(make_image(64 + 16 * i, 48 + 8 * (i % 4), i))).convert("RGB")
        request = JobRequest.model_validate({"messages": [{"role": "user", "content": [
            {"type": "image", "image": f"https://img.example/{i}.png"},
            {"type": "text", "text": PROMPTS[i]}]}]})
        out.append((request, [image]))
    return out


def generate(model: Any, batch: dict[str, Any]) -> float:
    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
    return time.perf_counter() - started


def beside(pool: Executor, path: str, work: list[tuple[Any, list[Any]]], model: Any,
           batch: dict[str, Any]) -> tuple[float, float]:
    """(seconds until every request is prepared, seconds of the generate running beside)."""
    timing: dict[str, float] = {}
    thread = threading.Thread(target=lambda: timing.update(gen=generate(model, batch)))
    thread.start()
    started = time.perf_counter()
    futures = [pool.submit(_encode, path, request, images) for request, images in work]
    for future in futures:
        future.result()
    prepared = time.perf_counter() - started
    thread.join()
    return prepared, timing["gen"]


def main() -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(1)
    path = str(tiny_model_path("idefics3"))
    _load(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    work = workload()
    batch = _processor.apply_chat_template(  # the 8 requests' prompts, batched, for generate
        [[{"role": "user", "content": [{"type": "image", "image": images[0]},
                                       {"type": "text", "text": PROMPTS[i]}]}]
         for i, (_request, images) in enumerate(work)],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True})
    pools: dict[str, Executor] = {
        "2 threads (the engine)": ThreadPoolExecutor(2),
        "4 threads": ThreadPoolExecutor(4),
        "1 process": ProcessPoolExecutor(1, initializer=_load, initargs=(path,)),
        "2 processes": ProcessPoolExecutor(2, initializer=_load, initargs=(path,)),
    }
    for pool in pools.values():  # warm up: processes started, processors loaded
        [f.result() for f in [pool.submit(_encode, path, r, i) for r, i in work]]
    alone = [generate(model, batch) for _ in range(2)]
    prepared: dict[str, list[float]] = {name: [] for name in pools}
    generating: dict[str, list[float]] = {name: [] for name in pools}
    for _ in range(REPEATS):
        alone.append(generate(model, batch))
        for name, pool in pools.items():  # interleaved: noise from elsewhere hits all alike
            ready, gen = beside(pool, path, work, model, batch)
            prepared[name].append(ready * 1000)
            generating[name].append(gen * 1000)
    for pool in pools.values():
        pool.shutdown()
    base = min(alone) * 1000
    rows = [("generate alone (8 rows x 32 tokens)", f"{base:.0f} ms (best of {len(alone)})")]
    for name in pools:
        rows.append((f"{name}: 8 prepared in ms; generate beside it x alone",
                     f"{min(prepared[name]):.0f}-{max(prepared[name]):.0f}; "
                     f"{min(generating[name]) / base:.2f}-{max(generating[name]) / base:.2f}"))
    report(f"Preparing 8 requests beside a decode loop, tiny idefics3, 1 torch thread, "
           f"{REPEATS} repeats", {"prepared_ms": prepared, "generate_ms": generating,
                                  "generate_alone_ms": base}, rows)


if __name__ == "__main__":
    main()
