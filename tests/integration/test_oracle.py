"""The seeds' three flows through producer -> Redis -> worker process -> result, for every tiny
architecture; the text must equal the seeds' direct code, greedy, token for token."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ARCHS
from tests.oracle import oracle_text, with_images

pytestmark = pytest.mark.integration


def flows(url: Any) -> dict[str, list[dict[str, Any]]]:
    cats, bee = url("/cats.png"), url("/bee.jpg")
    return {
        "one_image": [{"role": "user", "content": [
            {"type": "image", "image": cats},
            {"type": "text", "text": "What do we see in this image?"}]}],
        "two_images": [{"role": "user", "content": [
            {"type": "image", "image": cats}, {"type": "image", "image": bee},
            {"type": "text", "text": "What do you see in these images?"}]}],
        "multi_turn": [
            {"role": "user", "content": [
                {"type": "image", "image": cats},
                {"type": "text", "text": "What do we see in this image?"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "In this image we can see two cats on the nets."}]},
            {"role": "user", "content": [
                {"type": "image", "image": bee},
                {"type": "text", "text": "And how about this image?"}]}],
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_seed_flows_match_the_oracle(arch: str, producer: Any, workers: Any, image_server: Any,
                                     tiny_paths: dict[str, str]) -> None:
    served = {image_server.url(path): body for path, (_s, body, _c) in image_server.files.items()}
    jobs = {name: producer.submit(messages, model=f"tiny-{arch}", max_new_tokens=24)
            for name, messages in flows(image_server.url).items()}
    for name, job_id in jobs.items():
        result = producer.result(job_id, timeout=120)
        expected = oracle_text(tiny_paths[arch], with_images(flows(image_server.url)[name], served),
                               max_new_tokens=24)
        assert result.text == expected, f"{arch}/{name}"
        assert result.text, f"{arch}/{name}: empty output cannot prove anything"
        assert result.finish_reason in ("stop", "length")
        assert result.usage.completion_tokens >= 1
        assert result.model == f"tiny-{arch}"
        state = producer.status(job_id)
        assert state.status == "SUCCEEDED" and state.attempts == 1
        assert_complete_stream(list(producer.stream(job_id, timeout=30)), result.text)


def assert_complete_stream(events: list[Any], text: str) -> None:
    """Contiguous seqs from 0, whole-character deltas that add up to the text, one terminal."""
    assert [event.seq for event in events] == list(range(len(events)))
    assert [event.terminal for event in events] == [False] * (len(events) - 1) + [True]
    assert "".join(event.delta for event in events) == text
    assert events[-1].type == "done" and events[-1].usage is not None


def mixed_jobs(url: Any) -> list[tuple[list[dict[str, Any]], int]]:
    """Eight requests of mixed prompts, image counts (0-3) and image sizes, with their lengths."""
    def user(*parts: Any) -> dict[str, Any]:
        return {"role": "user", "content": list(parts)}

    def img(path: str) -> dict[str, str]:
        return {"type": "image", "image": url(path)}

    def txt(text: str) -> dict[str, str]:
        return {"type": "text", "text": text}

    return [
        ([user(img("/cats.png"), txt("What do we see in this image?"))], 20),
        ([user(img("/big.png"), img("/tall.jpg"), txt("Compare these two pictures, please."))], 12),
        ([user(txt("Tell me a short story about a bee in a garden full of flowers."))], 16),
        ([user(img("/wide.png"), img("/bee.jpg"), img("/cats.png"), txt("Three images?"))], 24),
        ([user(img("/tall.jpg"), txt("Caption."))], 8),
        (flows(url)["multi_turn"], 20),
        ([user(img("/bee.jpg"), txt("Is there a bee? Answer in one long sentence please."))], 18),
        ([user(img("/big.png"), txt("Describe the colours."))], 10),
    ]


# end to end for one architecture of each input layout (flattened patches, image stacks); every
# architecture's batches are checked in the test process (test_engine.py), without Celery
@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3"])
def test_concurrent_mixed_jobs_match_their_oracle(arch: str, producer: Any, workers: Any,
                                                  image_server: Any,
                                                  tiny_paths: dict[str, str]) -> None:
    """Eight concurrent jobs are batched, and each answer equals the one it gets alone."""
    served = {image_server.url(path): body for path, (_s, body, _c) in image_server.files.items()}
    log_before = len(workers[arch].log())
    jobs = [(producer.submit(messages, model=f"tiny-{arch}", max_new_tokens=n), messages, n)
            for messages, n in mixed_jobs(image_server.url)]
    for job_id, messages, n in jobs:
        result = producer.result(job_id, timeout=120)
        expected = oracle_text(tiny_paths[arch], with_images(messages, served), max_new_tokens=n)
        assert result.text == expected, f"{arch}: job of {n} tokens differs from its oracle"
        assert_complete_stream(list(producer.stream(job_id, timeout=30)), result.text)
    sizes = [int(line.split("batch=")[1].split()[0])
             for line in workers[arch].log()[log_before:].splitlines() if "generate batch=" in line]
    assert max(sizes) > 1, f"{arch}: the eight jobs never shared a batch: {sizes}"


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_each_scheduler_matches_the_oracle_through_a_worker(
        scheduler: str, producer: Any, redis_server: Any, image_server: Any,
        tiny_paths: dict[str, str], tmp_path: Any) -> None:
    """Mixed concurrent jobs through a worker process that runs the scheduler asked for."""
    from tests.servers import WorkerProcess

    arch = "idefics3"
    name = f"tiny-{arch}-{scheduler}"
    worker = WorkerProcess(tiny_paths[arch], redis_server.url, name=name,
                           image_port=image_server.port, log_dir=str(tmp_path),
                           env={"VLMQ_SCHEDULER": scheduler, "VLMQ_BATCH_WAIT_MS": "30"})
    try:
        worker.wait_ready()
        served = {image_server.url(p): body for p, (_s, body, _c) in image_server.files.items()}
        jobs = [(producer.submit(messages, model=name, max_new_tokens=n), messages, n)
                for messages, n in mixed_jobs(image_server.url)]
        for job_id, messages, n in jobs:
            result = producer.result(job_id, timeout=120)
            expected = oracle_text(tiny_paths[arch], with_images(messages, served), n)
            assert result.text == expected, f"{scheduler}: job of {n} tokens differs"
            assert_complete_stream(list(producer.stream(job_id, timeout=30)), result.text)
        log = worker.log()
        assert ("joined=" in log) == (scheduler == "continuous")  # the engine asked for ran
    finally:
        worker.stop()
