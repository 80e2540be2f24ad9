"""Shared bench set-up: real Redis, loopback images, worker processes, the in-process baseline.

Every benchmark runs its baseline in the same run, on the same inputs, and prints ratios.
``BENCH_QUICK=1`` shrinks job counts (for a smoke run); ``BENCH_THREADS`` sets torch threads
for both the worker and the baseline (default: all cores).
"""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.servers import ImageServer, RedisServer, WorkerProcess

QUICK = os.environ.get("BENCH_QUICK") == "1"
THREADS = int(os.environ.get("BENCH_THREADS", str(os.cpu_count() or 1)))
PROMPTS = ["What do we see in this image?", "Describe the colours in this picture.",
           "Is there an animal here? Answer in a sentence.", "Write a caption for this image.",
           "What shapes can you see?", "Tell me about the background.",
           "How many objects are there?", "What is the mood of this picture?"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), 2), "p99": round(percentile(values, 99), 2),
            "mean": round(statistics.fmean(values), 2) if values else float("nan")}


def make_image(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7 + seed * 40) % 256, (y * 5 + seed * 70) % 256, (x ^ y) % 256)
                   for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def jobs(images: ImageServer, count: int) -> list[dict[str, Any]]:
    """``count`` single-image requests of varied prompts and image sizes."""
    out = []
    for i in range(count):
        path = f"/img{i % 6}.png"
        if path not in images.files:
            images.put(path, make_image(64 + 16 * (i % 6), 48 + 8 * (i % 4), i))
        out.append({"messages": [{"role": "user", "content": [
            {"type": "image", "image": images.url(path)},
            {"type": "text", "text": PROMPTS[i % len(PROMPTS)]}]}]})
    return out


def worker_env(**env: str) -> dict[str, str]:
    """A bench worker's environment: the same torch threads as the baseline, quiet logs."""
    return {"OMP_NUM_THREADS": str(THREADS), "VLMQ_LOG_LEVEL": "WARNING", **env}


@contextmanager
def service(model_path: str, name: str, **env: str) -> Any:
    """Redis + image server + one worker process; yields (producer, images, worker)."""
    from producer import Producer

    redis_server, images = RedisServer(), ImageServer()
    worker = WorkerProcess(model_path, redis_server.url, name=name, image_port=images.port,
                           env=worker_env(**env))
    try:
        worker.wait_ready()
        with Producer(redis_server.url) as producer:
            warm = producer.submit(prompt="warm up", model=name, max_new_tokens=2)
            producer.result(warm, timeout=300)
            yield producer, images, worker
    finally:
        worker.stop()
        images.close()
        redis_server.stop()


class Baseline:
    """The seeds' direct code in this process: apply_chat_template, generate, decode."""

    def __init__(self, model_path: str) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(
            model_path, dtype=torch.float32).eval()  # as the worker loads it on CPU

    def conversation(self, request: dict[str, Any], images: ImageServer) -> list[dict[str, Any]]:
        from PIL import Image

        out = []
        for message in request["messages"]:
            content = []
            for part in message["content"]:
                if part["type"] == "image":
                    path = part["image"].split(str(images.port), 1)[1]
                    body = images.files[path][1]
                    content.append({"type": "image",
                                    "image": Image.open(io.BytesIO(body)).convert("RGB")})
                else:
                    content.append(part)
            out.append({"role": message["role"], "content": content})
        return out

    def run(self, conversations: list[list[dict[str, Any]]], max_new_tokens: int) -> list[str]:
        """One generate for all the conversations given (one = the seeds' sequential way)."""
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": len(conversations) > 1})
        input_len = inputs["input_ids"].shape[1]
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return list(self.processor.batch_decode(out[:, input_len:], skip_special_tokens=True))


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds each group of a process's threads has used (Linux: ``/proc``; the worker
    names its threads, ``worker.threads``; ``vlmq-prep_0`` and ``vlmq-prep_1`` add up as
    ``vlmq-prep``, and the main thread, Celery's consumer, shows as ``python``). Empty where
    there is no ``/proc``."""
    used: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*") if Path("/proc").is_dir() else []:
        try:  # schedstat: nanoseconds on a CPU (stat's ticks are too coarse for a burst)
            name = (task / "comm").read_text().strip()
            seconds = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
        group = re.sub(r"_\d+$", "", name)
        used[group] = used.get(group, 0.0) + seconds
    return used


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - started, value


def report(name: str, figures: dict[str, Any], rows: list[tuple[str, str]]) -> None:
    print(json.dumps({"bench": name, **figures}))
    width = max(len(label) for label, _ in rows)
    print(f"\n{name}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    print(flush=True)
