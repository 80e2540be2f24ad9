"""Host cost per decode step of the continuous engine: 32 rows, a stub forward (precomputed logits).

The stub returns fixed logits and grows the cache by one zero column per step, so what is left
of a step is the engine's own work: building the step's inputs, choosing tokens, recording
them, checking ends (and the streamer thread sending every 20 ms, through a ledger that only
counts). Torch pinned to 1 thread. Prints the median and p90 per step, without the stub.
"""

from __future__ import annotations

import statistics
import time
import uuid
from types import SimpleNamespace
from typing import Any

ROWS, TOKENS, VOCAB, LAYERS = 32, 200, 32_000, 24


class StubModel:
    """Just enough of a model for the engine: a config, a forward and its signature."""

    def __init__(self, eos: int) -> None:
        import torch

        self.torch = torch
        self.config = SimpleNamespace(model_type="llava")
        self.generation_config = SimpleNamespace(eos_token_id=eos)
        self.logits = torch.randn(ROWS, 1, VOCAB)
        self.logits[:, :, eos] = -1e9
        self.step_s: list[float] = []
        self.forward_s: list[float] = []
        self.last_end = 0.0

    def forward(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                cache: Any = None, use_cache: bool = True, logits_to_keep: int = 1,
                **kwargs: Any) -> Any:
        raise NotImplementedError  # the signature is what the engine reads

    def __call__(self, input_ids: Any, attention_mask: Any, cache: Any = None,
                 **kwargs: Any) -> Any:
        torch = self.torch
        started = time.perf_counter()
        rows, width = input_ids.shape
        if cache is None:  # prefill
            from transformers import DynamicCache

            cache = DynamicCache()
            for layer in range(LAYERS):
                cache.update(torch.zeros(rows, 1, width, 8), torch.zeros(rows, 1, width, 8), layer)
        else:
            for layer in cache.layers:
                layer.keys = torch.cat([layer.keys, torch.zeros(rows, 1, 1, 8)], dim=2)
                layer.values = torch.cat([layer.values, torch.zeros(rows, 1, 1, 8)], dim=2)
            if rows == ROWS and self.last_end:
                self.step_s.append(started - self.last_end)
        out = SimpleNamespace(logits=self.logits[:rows], cache=cache)
        self.last_end = time.perf_counter()
        if width == 1:
            self.forward_s.append(self.last_end - started)
        return out


def main() -> None:
    import torch
    from transformers import AutoProcessor

    from bench.burst_bench import CountingLedger, Images
    from producer.schema import JobRequest
    from worker.engine.continuous import ContinuousEngine
    from worker.engine.publisher import Publisher
    from worker.model.load import LoadedModel
    from worker.settings import WorkerSettings
    from worker.tiny import tiny_model_path

    torch.set_num_threads(1)
    processor = AutoProcessor.from_pretrained(str(tiny_model_path("llava")))
    eos = processor.tokenizer.eos_token_id
    model = StubModel(eos)
    loaded = LoadedModel(model=model, processor=processor, model_id="stub",
                         device=torch.device("cpu"), dtype=torch.float32, attn="stub",
                         quantize="none", load_s=0.0, weight_bytes=0)
    settings = WorkerSettings(device="cpu", max_batch_size=ROWS)
    engine = ContinuousEngine(loaded, settings, Images({}), Publisher(CountingLedger()))  # type: ignore[arg-type]
    from worker.engine.work import Work

    now = time.time()
    works = [Work(job_id=uuid.uuid4().hex, fence=1, created_at=now, deadline=now + 600,
                  request=JobRequest.model_validate({
                      "messages": [{"role": "user", "content": [
                          {"type": "text", "text": f"Question number {i}, please answer."}]}],
                      "params": {"max_new_tokens": TOKENS}}))
             for i in range(ROWS)]
    for work in works:
        engine.submit(work)
    for work in works:
        work.future.result(timeout=600)
    engine.close()
    steps = sorted(model.step_s)
    print(f"\nHost cost per step, {ROWS} rows, stub forward, 1 torch thread "
          f"({len(steps)} steps of {ROWS} rows)")
    print(f"  median {statistics.median(steps) * 1000:.3f} ms, "
          f"p90 {steps[int(len(steps) * 0.9)] * 1000:.3f} ms (target <= 0.5 ms); "
          f"stub forward median {statistics.median(model.forward_s) * 1000:.3f} ms\n")


if __name__ == "__main__":
    main()
