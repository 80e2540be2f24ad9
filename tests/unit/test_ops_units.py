"""Pure logic of the operations pieces: log redaction, health verdicts, where results go,
metrics bookkeeping, queue names, and that ``import producer`` stays free of boto3."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from producer.broker import is_queue_list
from producer.client import build_request
from producer.errors import ResultUnavailable
from producer.s3 import S3Config, split_uri
from worker.ops.health import check
from worker.ops.logs import JsonFormatter, PlainFormatter, redact


def test_redact_masks_url_passwords_and_shortens_data_uris() -> None:
    line = ("ledger redis://:s3cr3t@db:6379/0 broker amqp://user:pa55@mq//v "
            "image data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA== plain https://example.com/a")
    out = redact(line)
    assert "s3cr3t" not in out and "pa55" not in out and "iVBORw0KGgo" not in out
    assert "redis://:***@db:6379/0" in out and "amqp://user:***@mq//v" in out
    assert "data:image/png;base64,<26 chars>" in out
    assert out.endswith("plain https://example.com/a")


def _record(msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("vlmq.tasks", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_formatter_one_object_per_line_with_job_fields() -> None:
    line = JsonFormatter().format(_record("job %s FAILED via redis://:pw@h/0", "abc",
                                          job_id="abc", status="FAILED", code="INTERNAL"))
    data = json.loads(line)
    assert "\n" not in line
    assert data["job_id"] == "abc" and data["status"] == "FAILED" and data["code"] == "INTERNAL"
    assert data["msg"] == "job abc FAILED via redis://:***@h/0" and data["level"] == "INFO"
    plain = PlainFormatter().format(_record("url redis://:pw@h/0"))
    assert plain.endswith("INFO vlmq.tasks: url redis://:***@h/0")


def _health_file(tmp_path: Path, **state: Any) -> str:
    base = {"pid": os.getpid(), "ts": time.time(), "interval_s": 1.0, "model_loaded": True,
            "redis_ok": True, "broker_ok": True, "consuming": True, "stopping": False}
    path = tmp_path / "health.json"
    path.write_text(json.dumps({**base, **state}))
    return str(path)


def test_health_check_verdicts(tmp_path: Path) -> None:
    assert check(_health_file(tmp_path))[0] is True
    ok, report = check(_health_file(tmp_path, ts=time.time() - 100))  # 3 beats, at least 30s
    assert not ok and "last heartbeat" in report["problems"][0]
    assert check(_health_file(tmp_path, ts=time.time() - 100), max_age=200)[0] is True
    ok, report = check(_health_file(tmp_path, broker_ok=False, consuming=False))
    assert report["problems"] == ["the broker does not answer", "Celery is not consuming"]
    ok, report = check(_health_file(tmp_path, stopping=True))
    assert not ok and "the worker is shutting down" in report["problems"]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    ok, report = check(_health_file(tmp_path, pid=int(gone.stdout)))
    assert not ok and "is gone" in report["problems"][0]
    (tmp_path / "bad.json").write_text("{not json")
    assert "cannot read" in check(str(tmp_path / "bad.json"))[1]["problems"][0]
    assert "no health file" in check(str(tmp_path / "none.json"))[1]["problems"][0]


def test_health_check_of_a_supervised_worker_reads_every_gpu_file(tmp_path: Path) -> None:
    good = json.loads(Path(_health_file(tmp_path)).read_text())
    (tmp_path / "health.gpu0.json").write_text(json.dumps(good))
    (tmp_path / "health.gpu1.json").write_text(json.dumps({**good, "consuming": False}))
    (tmp_path / "health.json").unlink()
    ok, report = check(str(tmp_path / "health.json"))
    assert not ok and report["problems"] == [
        f"{tmp_path / 'health.gpu1.json'}: Celery is not consuming"]
    (tmp_path / "health.gpu1.json").write_text(json.dumps(good))
    assert check(str(tmp_path / "health.json"))[0] is True


def _store(**settings: Any) -> Any:
    from worker.results import ResultStore
    from worker.settings import WorkerSettings

    return ResultStore(WorkerSettings(**settings), client=object())


def test_where_results_go() -> None:
    store = _store(s3_result_bucket="b", s3_result_over_bytes=100)
    assert store.where("s3", 10) == "s3"  # the request asks
    assert store.where("redis", 100) == "redis" and store.where("redis", 101) == "s3"  # size
    assert _store(s3_result_bucket="b", result_store="s3").where("redis", 1) == "s3"  # default
    assert _store(s3_result_over_bytes=100).where("redis", 10**6) == "redis"  # no bucket
    assert _store(s3_result_bucket="b").where("redis", 10**6) == "redis"  # 0: never by size
    keyed = _store(s3_result_bucket="b", s3_result_prefix="/a/b/")
    assert keyed.uri("j1") == "s3://b/a/b/j1.json"
    assert _store(s3_result_bucket="b", s3_result_prefix="").uri("j1") == "s3://b/j1.json"


def test_s3_config_and_uris() -> None:
    config = S3Config.from_env({"VLMQ_S3_ENDPOINT_URL": "http://minio:9000",
                                "VLMQ_S3_SECRET_ACCESS_KEY": "x", "VLMQ_S3_REGION": ""})
    assert config.endpoint_url == "http://minio:9000" and config.region is None
    assert "x" not in repr(config)  # the secret stays out of reprs and logs
    assert split_uri("s3://bucket/a/b.json") == ("bucket", "a/b.json")
    for bad in ("s3://bucket", "http://bucket/key", "bucket/key"):
        with pytest.raises(ResultUnavailable):
            split_uri(bad)


def test_queue_list_names() -> None:
    assert is_queue_list("vlmq") and is_queue_list("vlmq.tiny-x")
    assert is_queue_list("vlmq.m\x06\x163")
    assert not is_queue_list("vlmq:job:1:attempts") and not is_queue_list("vlmqx")


def test_producer_modules_do_not_import_boto3() -> None:
    code = ("import sys, producer, producer.cli, producer.client, producer.admin, producer.s3; "
            "print(sorted(m for m in ('boto3', 'botocore', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    assert out.stdout.strip() == "[]"


def test_metrics_batch_once_per_batch_and_first_token() -> None:
    from producer.schema import Timings, Usage
    from worker.engine.work import Outcome, Work
    from worker.ops.metrics import Metrics

    metrics = Metrics("m")
    request = build_request(prompt="hi", images=["https://example.com/a.png"])
    rows = [Work(job_id=f"j{i}", fence=1, request=request, created_at=100.0, deadline=1e12)
            for i in range(3)]
    for row in rows:  # what the engine records on each row
        row.gen_started, row.batch_size, row.first_token_at = 101.0, 3, 101.25
        row.fetch_ms, row.preprocess_ms = 30.0, 12.0
    outcome = Outcome(text="x", finish_reason="stop",
                      usage=Usage(prompt_tokens=10, completion_tokens=4),
                      timings=Timings(queued_ms=500, generate_ms=2000, total_ms=3000))
    for row in rows:  # each row of the one batch finishes; the batch is counted once
        metrics.job_finished(row, outcome)
    model = {"model": "m"}

    def value(name: str, labels: dict[str, str] | None = None) -> float | None:
        return metrics.registry.get_sample_value(name, {**model, **(labels or {})})

    assert value("vlmq_batch_size_count") == 1 and value("vlmq_batch_size_sum") == 3
    # from the start of the prefill (101.0) to the first token (101.25)
    assert value("vlmq_time_to_first_token_seconds_sum") == pytest.approx(0.75)
    # the other 3 tokens in the remaining 1.75 s of generation
    assert value("vlmq_time_per_output_token_seconds_sum") == pytest.approx(3 * 1.75 / 3)
    assert value("vlmq_queue_time_seconds_count") == 3
    assert value("vlmq_fetch_seconds_sum") == pytest.approx(0.09)
    assert value("vlmq_prompt_tokens_total") == 30 and value("vlmq_generation_tokens_total") == 12
    rows[0].first_token_at = 0.0  # no token came out: no time to first token
    metrics.job_finished(rows[0], outcome)
    assert value("vlmq_time_to_first_token_seconds_count") == 3
    metrics.job_ended("FAILED", "IMAGE_NOT_FOUND")
    metrics.job_ended("SUCCEEDED")
    assert value("vlmq_jobs_total", {"status": "failed"}) == 1
    assert value("vlmq_jobs_total", {"status": "succeeded"}) == 1
    assert value("vlmq_job_failures_total", {"code": "IMAGE_NOT_FOUND"}) == 1
    assert value("vlmq_image_fetch_failures_total", {"reason": "not_found"}) == 1
    names = {s.name for family in metrics.registry.collect() for s in family.samples}
    assert not any(name.endswith("_created") for name in names)


def test_queue_gauges_render_for_prometheus() -> None:
    from producer.exposition import render

    text = render({"vlmq.tiny-a": {"depth": 3, "queued": 4, "oldest_age_s": 12.5},
                   "vlmq": {"depth": None, "queued": 0, "oldest_age_s": 0.0}})
    assert 'vlmq_queue_depth{model="tiny-a"} 3.0' in text
    assert 'vlmq_queue_depth{model="vlmq"}' not in text  # the broker could not say
    assert 'vlmq_oldest_queued_age_seconds{model="tiny-a"} 12.5' in text
    assert text.count("# TYPE vlmq_queued_jobs gauge") == 1


def test_quarantine_lets_a_retry_in_only_alone() -> None:
    from worker.ops.quarantine import Quarantine

    gate = Quarantine()
    assert gate.enter(alone=False) and gate.enter(alone=False)  # ordinary jobs share it
    assert not gate.enter(alone=True)  # a retry waits for the jobs in hand
    gate.leave(alone=False)
    gate.leave(alone=False)
    assert gate.enter(alone=True)
    assert not gate.enter(alone=False) and not gate.enter(alone=True)  # nothing beside it
    gate.leave(alone=True)
    with gate.hold(alone=False):
        assert not gate.enter(alone=True)
    assert gate.enter(alone=True)


def test_the_dashboard_queries_only_metrics_the_workers_export() -> None:
    import json
    import re
    from pathlib import Path

    from producer.exposition import GAUGES
    from worker.ops.metrics import Metrics

    metrics = Metrics("m")
    families = list(metrics.registry.collect())
    exported = {s.name for family in families for s in family.samples}
    exported |= {f"{f.name}_total" for f in families if f.type == "counter"}  # none counted yet
    exported |= {name for name, _key, _text in GAUGES}
    exported |= {"vlmq_running_rows", "vlmq_waiting_jobs"}  # bound to a live worker
    dashboard = json.loads((Path(__file__).parents[2] / "docs/grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bvlmq_\w+", target["expr"])}
    assert queried and queried <= exported, queried - exported
