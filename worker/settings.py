"""WorkerSettings: every knob of a worker, read once at start (env prefix ``VLMQ_``), passed down.

No other worker module reads a ``VLMQ_*`` setting from ``os.environ``; CLI flags override the
environment. Outside the settings only ``CUDA_VISIBLE_DEVICES`` is read (the GPU supervisor pins
its children with it; ``--check`` reports it) and ``VLMQ_TINY_CACHE`` by the offline tiny-model
builder (``worker/tiny.py``, a development tool).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from producer.keys import DEFAULT_QUEUE, DEFAULT_REDIS_URL
from producer.s3 import S3Config

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"


def _split(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]
CsvInts = Annotated[list[int], NoDecode]


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLMQ_", extra="ignore", frozen=True)

    # where and what
    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str | None = None  # defaults to redis_url
    queue: str = DEFAULT_QUEUE
    model: str = DEFAULT_MODEL
    model_name: str | None = None  # the id reported in results; defaults to ``model``
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    quantize: Literal["none", "int8", "int8-bnb", "nf4-bnb"] = "none"
    hostname: str | None = None

    # GPU workers (worker/ops/supervisor.py) and recycling (worker/model/memory.py); 0 = off
    gpus: str | None = None  # "0,1" or "all": one supervised child process per GPU
    supervisor_child_device: str = "cuda:0"  # for tests only: "cpu" runs children on the CPU
    stop_grace_s: float = Field(60.0, gt=0)  # SIGTERM to children, then SIGKILL after this
    max_rss_mb: int = Field(0, ge=0)
    max_gpu_reserved_mb: int = Field(0, ge=0)

    # generation and batching
    scheduler: Literal["static", "continuous"] = "continuous"  # worker/engine/{static,continuous}
    stream_interval_ms: float = Field(20.0, ge=1, le=10_000)  # continuous: stream events this often
    max_new_tokens_cap: int = Field(4096, ge=1)
    max_input_tokens: int = Field(16_384, ge=16)
    max_generate_s: float = Field(600.0, gt=0)
    max_batch_size: int = Field(8, ge=1, le=256)  # rows generating at once
    batch_wait_ms: float = Field(2.0, ge=0)  # static: wait this long for more rows
    stream_events: bool = True  # off: no per-step events (cancel checks go on); benchmarks
    # static: rows x longest prompt; continuous: rows x cache length (padding included)
    max_batch_tokens: int = Field(65_536, ge=16)
    max_batch_pixels: int = Field(64_000_000, ge=1024)  # image pixels in one batch / prefill
    control_tokens: Literal["neutralise", "refuse"] = "neutralise"  # in request text

    # ledger and reliability
    retention_s: int = Field(86_400, ge=60)
    lease_s: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    stream_maxlen: int = Field(10_000, ge=100)
    visibility_timeout_s: float | None = Field(None, gt=0)  # default: max_generate_s + 300
    soft_shutdown_s: float = Field(10.0, ge=0)  # on SIGTERM, time for jobs in hand to finish
    reconcile_interval_s: float = Field(10.0, gt=0)
    requeue_grace_s: float = Field(60.0, gt=0)
    allow_eviction: bool = False  # serve on a ledger Redis that evicts keys (records can vanish)

    # image fetching and decoding
    fetch_connect_timeout_s: float = Field(5.0, gt=0)
    fetch_read_timeout_s: float = Field(10.0, gt=0)
    fetch_total_timeout_s: float = Field(30.0, gt=0)
    fetch_retries: int = Field(2, ge=0, le=10)
    max_redirects: int = Field(3, ge=0, le=10)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1024)
    allow_private_addresses: bool = False
    allowed_ports: CsvInts = Field(default_factory=lambda: [80, 443])
    host_allowlist: CsvList = Field(default_factory=list)
    host_denylist: CsvList = Field(default_factory=list)
    fetch_proxy: str | None = None
    user_agent: str = "vlmq-worker/0.1 (+image fetcher)"
    image_cache_bytes: int = Field(256 * 1024 * 1024, ge=0)
    fetch_concurrency: int = Field(4, ge=1, le=32)  # threads fetching/decoding one job's images
    fetch_jobs: int = Field(16, ge=1, le=256)  # jobs fetching remote images at once (own pool)
    fetch_per_host: int = Field(4, ge=1, le=64)  # fetches in flight per host:port

    # S3 (image sources and results)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_allowed_buckets: CsvList = Field(default_factory=list)
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None

    # results: Redis (in the record) or s3://{bucket}/{prefix}/{job_id}.json (worker/results.py)
    result_store: Literal["redis", "s3"] = "redis"  # default for requests that say "redis"
    s3_result_bucket: str | None = None
    s3_result_prefix: str = "vlmq/results"
    s3_result_over_bytes: int = Field(0, ge=0)  # results larger than this go to S3; 0: never
    s3_result_attempts: int = Field(4, ge=1, le=20)
    s3_result_backoff_s: float = Field(0.5, ge=0)  # doubled after each failed attempt

    # message and record signing (producer.signing, worker/security.py): all three, or none
    security_key: str | None = None  # PEM private key (RSA) this worker signs re-sends with
    security_certificate: str | None = None  # its certificate (PEM), also in the store
    security_cert_store: str | None = None  # directory of the trusted signers' certificates
    security_key_password: SecretStr | None = None  # if the private key is encrypted

    # operations: metrics endpoint, health file, logs
    metrics_port: int = Field(9464, ge=0, le=65535)  # 0: no metrics endpoint
    metrics_addr: str = "0.0.0.0"
    health_file: str = "/tmp/vlmq-worker-health.json"
    log_level: str = "INFO"
    log_format: Literal["plain", "json"] = "plain"

    def s3_config(self) -> S3Config:
        """Endpoint, region and credentials for S3 (image sources and results)."""
        secret = self.s3_secret_access_key
        return S3Config(endpoint_url=self.s3_endpoint_url or None, region=self.s3_region or None,
                        access_key_id=self.s3_access_key_id or None,
                        secret_access_key=secret.get_secret_value() if secret else None)

    def served_model(self) -> str:
        return self.model_name or self.model

    def broker(self) -> str:
        return self.broker_url or self.redis_url

    def signing(self) -> bool:
        return bool(self.security_key or self.security_certificate or self.security_cert_store)

    @field_validator(
        "allowed_ports", "host_allowlist", "host_denylist", "s3_allowed_buckets", mode="before"
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split(value)

    @field_validator("device", "supervisor_child_device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value


def problems(error: ValidationError, options: tuple[str, ...] = ()) -> list[str]:
    """One line per bad setting: the variable (and its option, when among ``options``), the
    value given, what is allowed."""
    lines = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else "?"
        given = item.get("input")
        shown = f"={given!r}" if isinstance(given, str | int | float) else ""
        option = f" (--{name.replace('_', '-')})" if name in options else ""
        lines.append(f"VLMQ_{name.upper()}{shown}{option}: "
                     f"{item['msg'].removeprefix('Value error, ')}")
    return lines
