"""Operations against real worker processes: the metrics endpoint, `vlmq-worker health`, logs."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from producer import JobFailed, Producer
from tests.servers import RedisServer, WorkerProcess
from tests.waiting import eventually
from worker.ops.health import check

pytestmark = pytest.mark.integration
MODEL = "tiny-qwen2_vl"
PASSWORD = "pw-0f7c2e9d"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def health(health_file: str, *extra: str) -> tuple[int, dict[str, Any]]:
    """``vlmq-worker health`` in a process of its own: exit code and report."""
    env = dict(os.environ, VLMQ_HEALTH_FILE=health_file)
    done = subprocess.run([sys.executable, "-m", "worker", "health", *extra], env=env,
                          capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout)


def healthy(health_file: str) -> bool:
    """The command's verdict without its process, for waiting on a change."""
    return check(health_file)[0]


def test_metrics_endpoint_counts_finished_jobs(producer: Producer, workers: Any,
                                               image_server: Any, redis_server: Any) -> None:
    port = workers["qwen2_vl"].metrics_port
    before = scrape(port)
    ok = producer.submit(prompt="What is it?", images=[image_server.url("/cats.png")],
                         model=MODEL, max_new_tokens=3)
    bad = producer.submit(prompt="What is it?", images=[image_server.url("/gone.png")],
                          model=MODEL, max_new_tokens=3)
    producer.result(ok, timeout=60)
    with pytest.raises(JobFailed):
        producer.result(bad, timeout=60)
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("vlmq_jobs_total", model=MODEL, status="succeeded") >= 1
    assert delta("vlmq_jobs_total", model=MODEL, status="failed") >= 1
    assert delta("vlmq_job_failures_total", model=MODEL, code="IMAGE_NOT_FOUND") >= 1
    assert delta("vlmq_image_fetch_failures_total", model=MODEL, reason="not_found") >= 1
    for histogram in ("vlmq_queue_time_seconds", "vlmq_time_to_first_token_seconds",
                      "vlmq_time_per_output_token_seconds", "vlmq_e2e_seconds",
                      "vlmq_prefill_seconds", "vlmq_fetch_seconds", "vlmq_preprocess_seconds",
                      "vlmq_batch_size"):
        assert delta(f"{histogram}_count", model=MODEL) >= 1, histogram
    assert delta("vlmq_generation_tokens_total", model=MODEL) >= 3
    assert delta("vlmq_prompt_tokens_total", model=MODEL) > 0
    assert delta("vlmq_images_fetched_total", model=MODEL) >= 1
    assert after[("vlmq_model_weight_bytes", (("model", MODEL),))] > 0
    assert ("vlmq_gpu_memory_allocated_bytes", (("model", MODEL),)) in after  # 0 on a CPU
    for gauge in ("vlmq_running_rows", "vlmq_waiting_jobs"):
        assert (gauge, (("model", MODEL),)) in after
    assert ("vlmq_oldest_queued_age_seconds", (("model", MODEL),)) in after
    assert not any(name.endswith("_created") for name, _labels in after)
    # the same queue gauges from any machine that reaches Redis
    done = subprocess.run([sys.executable, "-m", "producer", "--redis-url", redis_server.url,
                           "stats", "--prometheus"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    families = {family.name: family for family in text_string_to_metric_families(done.stdout)}
    ages = {s.labels["model"]: s.value
            for s in families["vlmq_oldest_queued_age_seconds"].samples}
    assert MODEL in ages and ages[MODEL] >= 0


def test_health_of_a_consuming_worker(workers: Any) -> None:
    worker = workers["qwen2_vl"]
    eventually(lambda: healthy(worker.health_file), what="the worker reports healthy")
    code, report = health(worker.health_file)
    assert report["healthy"] and report["consuming"] and report["problems"] == []
    assert report["model"] == MODEL and f"q-{MODEL}" in report["queues"]
    code, report = health(worker.health_file, "--max-age", "0")  # any heartbeat is too old
    assert code == 1 and "last heartbeat" in report["problems"][0]
    code, report = health(worker.health_file + ".missing")
    assert code == 1 and "no health file" in report["problems"][0]


@pytest.fixture()
def private_worker(tiny_paths: dict[str, str], image_server: Any,
                   tmp_path: Any) -> Any:
    """A worker with JSON logs, a fast heartbeat and its own password-protected Redis."""
    server = RedisServer()
    redis.Redis(port=server.port).config_set("requirepass", PASSWORD)
    url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    proc = WorkerProcess(tiny_paths["qwen2_vl"], url, name="ops-private",
                         image_port=image_server.port, log_dir=str(tmp_path),
                         env={"VLMQ_LOG_FORMAT": "json", "VLMQ_LEASE_S": "1.5"})
    try:
        proc.wait_ready()
        yield server, url, proc
    finally:
        proc.stop(signal.SIGKILL)  # its Redis is gone: nothing to shut down cleanly
        server.stop()


def test_json_logs_without_secrets_and_health_when_redis_goes(
        private_worker: Any, image_server: Any) -> None:
    server, url, proc = private_worker
    eventually(lambda: healthy(proc.health_file), what="the worker reports healthy")
    payload = base64.b64encode(b"definitely not an image, but long enough " * 4).decode()
    with Producer(url) as producer:
        ok = producer.submit(prompt="What is it?", images=[image_server.url("/cats.png")],
                             model="ops-private", max_new_tokens=2)
        bad = producer.submit(prompt="What is it?", images=[f"data:image/png;base64,{payload}"],
                              model="ops-private", max_new_tokens=2)
        producer.result(ok, timeout=60)
        with pytest.raises(JobFailed):
            producer.result(bad, timeout=60)

    log = proc.log()
    assert PASSWORD not in log and payload not in log
    assert f"redis://:***@127.0.0.1:{server.port}/0" in log  # the URL is logged, masked
    changes: dict[str, list[str]] = {ok: [], bad: []}
    for line in log.splitlines():
        for job_id in changes:
            if job_id in line:
                record = json.loads(line)  # every line about a job is one JSON object
                if record.get("status"):
                    assert record["job_id"] == job_id
                    changes[job_id].append(record["status"])
    assert changes == {ok: ["RUNNING", "SUCCEEDED"], bad: ["RUNNING", "FAILED"]}

    assert probe(proc.metrics_port, "/livez")[0] == 200
    eventually(lambda: probe(proc.metrics_port, "/readyz")[0] == 200, what="/readyz answers 200")
    assert probe(proc.metrics_port, "/nowhere")[0] == 404

    server.stop()  # Redis (ledger and broker) goes away: the worker cannot consume
    eventually(lambda: not healthy(proc.health_file), what="the worker reports unhealthy")
    code, report = health(proc.health_file)
    assert "the broker does not answer" in report["problems"]
    assert report["consuming"] is False
    status, body = probe(proc.metrics_port, "/readyz")  # the same verdict over HTTP
    assert status == 503 and "the ledger Redis does not answer" in body["problems"]
    assert probe(proc.metrics_port, "/livez")[0] == 200  # alive: no reason to restart it
    eventually(lambda: "does not answer" in proc.log(), what="the outage is logged")
    time.sleep(2.0)  # more heartbeats (0.5 s apart) while Redis is away
    proc.stop()  # SIGTERM: Celery's shutdown banner goes through the same JSON handler
    records = [json.loads(line) for line in proc.log().splitlines() if line.strip()]
    messages = [record["msg"] for record in records]  # every line was one JSON object
    assert not any("Traceback" in json.dumps(record) for record in records)
    assert sum("does not answer" in m and "ledger" in m for m in messages) == 1
    loading = next(i for i, r in enumerate(records) if r["msg"].startswith("loading model"))
    ready = next(i for i, r in enumerate(records) if r["msg"] == "model ready")
    assert loading < ready and records[ready]["quantize"] == "none"
    assert records[loading]["device"] == "cpu"
    announce = next(r for r in records if r["msg"].startswith("vlmq-worker: ready"))
    assert announce["level"] == "INFO" and announce["logger"] == "vlmq.announce"
    assert any("Warm shutdown" in m for m in messages)


def probe(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        return error.code, json.loads(body) if error.code != 404 else body.decode()


@pytest.mark.parametrize("env, args, expected", [
    ({"VLMQ_QUANTIZE": "int4"}, [], ["VLMQ_QUANTIZE='int4' (--quantize): Input should be"]),
    ({"VLMQ_MAX_BATCH_SIZE": "abc"}, [], ["VLMQ_MAX_BATCH_SIZE='abc' (--max-batch-size)"]),
    ({"VLMQ_ALLOWED_PORTS": "80,eighty"}, [], ["VLMQ_ALLOWED_PORTS='eighty': Input should"]),
    ({}, ["--device", "gpu"], ["VLMQ_DEVICE='gpu' (--device): use auto, cpu, cuda or cuda:N"]),
    ({"VLMQ_RESULT_STORE": "s3", "VLMQ_QUANTIZE": "int4"}, [],
     ["VLMQ_QUANTIZE='int4'"]),
    ({"VLMQ_RESULT_STORE": "s3"}, [], ["VLMQ_RESULT_STORE=s3 needs VLMQ_S3_RESULT_BUCKET"]),
])
def test_a_bad_setting_is_one_line_before_anything_loads(env: dict[str, str], args: list[str],
                                                          expected: list[str]) -> None:
    full = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    full.update(env, VLMQ_MODEL="/nonexistent/model/dir")  # a load would fail differently
    done = subprocess.run([sys.executable, "-m", "worker", *args], env=full,
                          capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == len(expected) and "Traceback" not in done.stderr
    for line, text in zip(lines, expected, strict=True):
        assert line.startswith("vlmq-worker: cannot start: ") and text in line, line
