"""The 8-job burst on the tiny idefics3 model: each scheduler beside batched and sequential runs.

Torch is pinned to ``BENCH_THREADS`` threads (default 1 here) in this process and in the worker.
Per repeat, on the same 8 requests (one image each, 64-144 px, 32 new tokens, greedy):
- ceiling: one in-process batched ``generate`` of the 8; sequential: 8 ``generate`` calls;
- engine: the in-process engine (continuous and static), images from memory, a ledger that
  only counts (what the engine itself costs, streaming included);
- service: producer -> Redis -> worker process -> result, for each scheduler.
Prints each figure's range over the repeats and the ratios (ceiling time / time, so 1.0 means
as fast as batched generate; sequential time / time), and the continuous worker's CPU time per
burst by thread (``/proc``, Linux): where the service's time goes beyond the engine's. The
worker is one Python process, so its threads' Python code runs one at a time (the GIL): their
CPU time added up is a floor for the burst's wall time.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from typing import Any

os.environ.setdefault("BENCH_THREADS", "1")

from bench.common import Baseline, jobs, report, service, thread_cpu  # noqa: E402
from bench.engine_bench import burst  # noqa: E402
from worker.tiny import tiny_model_path  # noqa: E402

TOKENS, SIZE = 32, 8
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


class CountingLedger:
    def __init__(self) -> None:
        self.rows = 0

    def append(self, rows: list[Any]) -> list[int]:
        self.rows += len(rows)
        return [1] * len(rows)


class Images:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def load_all(self, sources: list[str], *, max_pixels: Any, deadline: float) -> list[Any]:
        from PIL import Image

        return [Image.open(io.BytesIO(self.files[s])).convert("RGB") for s in sources]


def engine_burst(engine: Any, requests: list[dict[str, Any]]) -> tuple[float, list[str]]:
    from producer.schema import JobRequest
    from worker.engine.work import Work

    now = time.time()
    works = [Work(job_id=uuid.uuid4().hex, fence=1, created_at=now, deadline=now + 600,
                  request=JobRequest.model_validate(
                      {"messages": r["messages"], "params": {"max_new_tokens": TOKENS}}))
             for r in requests]
    started = time.perf_counter()
    futures = [engine.submit(w) for w in works]
    texts = [f.result(timeout=600).text for f in futures]
    return time.perf_counter() - started, texts


def spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def main() -> None:
    from worker.engine.continuous import create_engine
    from worker.engine.publisher import Publisher
    from worker.model.load import load
    from worker.settings import WorkerSettings

    path = str(tiny_model_path("idefics3"))
    base = Baseline(path)
    loaded = load(WorkerSettings(model=path, device="cpu"))
    schedulers = ("continuous", "static")
    times: dict[str, list[float]] = {}
    mismatches = dict.fromkeys(schedulers, 0)
    with service(path, "bench-continuous", VLMQ_SCHEDULER="continuous") as (p1, im1, w1), \
            service(path, "bench-static", VLMQ_SCHEDULER="static") as (p2, im2, _w2):
        producers = {"continuous": (p1, jobs(im1, SIZE)), "static": (p2, jobs(im2, SIZE))}
        requests = jobs(im1, SIZE)
        files = {im1.url(p): body for p, (_s, body, _c) in im1.files.items()}
        conversations = [base.conversation(r, im1) for r in requests]
        expected = [base.run([c], TOKENS)[0] for c in conversations]
        engines = {s: create_engine(loaded, WorkerSettings(model=path, device="cpu", scheduler=s),
                                    Images(files), Publisher(CountingLedger()))  # type: ignore[arg-type]
                   for s in schedulers}
        for scheduler in schedulers:  # warm up
            engine_burst(engines[scheduler], requests)
            burst(producers[scheduler][0], producers[scheduler][1], f"bench-{scheduler}", TOKENS)
        cpu_before = thread_cpu(w1.proc.pid)  # the continuous worker: only its bursts from here
        for _ in range(REPEATS):  # interleaved, so that load from elsewhere hits all alike
            started = time.perf_counter()
            base.run(conversations, TOKENS)
            times.setdefault("ceiling", []).append(time.perf_counter() - started)
            started = time.perf_counter()
            for conversation in conversations:
                base.run([conversation], TOKENS)
            times.setdefault("sequential", []).append(time.perf_counter() - started)
            for scheduler in schedulers:
                elapsed, texts = engine_burst(engines[scheduler], requests)
                times.setdefault(f"engine {scheduler}", []).append(elapsed)
                mismatches[scheduler] += sum(a != b for a, b in zip(texts, expected, strict=True))
                producer, served = producers[scheduler]
                times.setdefault(f"service {scheduler}", []).append(
                    burst(producer, served, f"bench-{scheduler}", TOKENS))
        cpu = {name: round((used - cpu_before.get(name, 0.0)) / REPEATS * 1000, 1)
               for name, used in thread_cpu(w1.proc.pid).items()}
        for engine in engines.values():
            engine.close()
    ceiling, sequential = times["ceiling"], times["sequential"]
    rows = [(name, f"{spread(values)} s") for name, values in times.items()]
    for name in [n for n in times if n.startswith(("engine", "service"))]:
        ratio = [c / t for c, t in zip(ceiling, times[name], strict=True)]
        speedup = [s / t for s, t in zip(sequential, times[name], strict=True)]
        rows.append((f"{name}: x ceiling, x sequential",
                     f"{spread(ratio)} (target >= 0.85), {spread(speedup)} (target >= 3)"))
    rows.append(("engine texts differing from sequential generate", str(mismatches)))
    if cpu:
        wall = sum(times["service continuous"]) / REPEATS * 1000
        busy = ", ".join(f"{name} {ms:.1f}" for name, ms in sorted(cpu.items(), key=lambda x: -x[1])
                         if ms >= 0.5)
        rows.append(("service continuous: worker CPU ms per burst by thread",
                     f"{busy}; all {sum(cpu.values()):.1f} in {wall:.1f} ms of wall time"))
    report(f"8-job burst, tiny idefics3, {os.environ['BENCH_THREADS']} torch thread(s), "
           f"{REPEATS} repeats", {"seconds": times, "mismatches": mismatches,
                                  "worker_cpu_ms": cpu}, rows)


if __name__ == "__main__":
    main()
