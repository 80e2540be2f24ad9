"""`make demo`: the seeds' multi-turn example through a real Redis, a real worker, a real result.

Uses $VLMQ_REDIS_URL if set, else starts an embedded redis-server on a free port. Serves the two
bundled sample images over loopback HTTP, starts one worker with the default model (or a tiny
offline model when the Hugging Face hub cannot be reached), submits, prints, shuts all down.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from producer import JobFailed, Producer
from tests.servers import ImageServer, RedisServer, WorkerProcess
from worker.settings import DEFAULT_MODEL

HERE = Path(__file__).parent


def pick_model() -> str:
    """The default model if the hub (or the local cache) has it, else a tiny offline one."""
    wanted = os.environ.get("VLMQ_MODEL", DEFAULT_MODEL)
    if Path(wanted).exists():
        return wanted
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(wanted, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
    except Exception as error:  # no network, no cache, gated repo...
        reason = str(error).splitlines()[0][:160]
        print(f"demo: cannot get {wanted} from the Hugging Face hub ({reason}).")
        print("demo: using a tiny offline model instead: random weights, so the answer is "
              "gibberish, but every step of the service is real.")
        from worker.tiny import tiny_model_path

        return str(tiny_model_path("idefics3"))


def main() -> int:
    model = pick_model()
    redis_url = os.environ.get("VLMQ_REDIS_URL")
    embedded = None if redis_url else RedisServer()
    redis_url = redis_url or (embedded.url if embedded else "")
    images = ImageServer()
    cats = images.put("/cats.png", (HERE / "cats.png").read_bytes())
    bee = images.put("/bee.jpg", (HERE / "bee.jpg").read_bytes(), ctype="image/jpeg")
    worker = WorkerProcess(model, redis_url, name="demo", image_port=images.port,
                           env={"HF_HUB_OFFLINE": "1", "VLMQ_LEASE_S": "30"})
    print(f"demo: redis {redis_url}{' (embedded)' if embedded else ''}, model {model}")
    try:
        worker.wait_ready()
        messages = [
            {"role": "user", "content": [
                {"type": "image", "image": cats},
                {"type": "text", "text": "What do we see in this image?"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "In this image we can see two cats on the nets."}]},
            {"role": "user", "content": [
                {"type": "image", "image": bee},
                {"type": "text", "text": "And how about this image?"}]},
        ]
        with Producer(redis_url) as producer:
            job_id = producer.submit(messages, model="demo", max_new_tokens=64)
            print(f"demo: submitted job {job_id}")
            try:
                result = producer.result(job_id, timeout=300)
            except JobFailed as error:
                print(f"demo: job failed: {error}")
                return 1
            state = producer.status(job_id)
        print(f"\nanswer: {result.text!r}\n")
        print(f"status: {state.status} (finish_reason {result.finish_reason}, "
              f"attempts {state.attempts}, worker {result.worker})")
        print("timings (ms):", json.dumps(result.timings.model_dump()))
        print("usage:", json.dumps(result.usage.model_dump()))
        return 0
    except Exception as error:
        print(f"demo: failed: {error}", file=sys.stderr)
        return 1
    finally:
        worker.stop()
        images.close()
        if embedded:
            embedded.stop()


if __name__ == "__main__":
    raise SystemExit(main())
