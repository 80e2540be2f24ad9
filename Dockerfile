# vlmq GPU worker image: one process, one loaded model, one GPU. The same image runs the HTTP
# gateway with --entrypoint vlmq-gateway (docker-compose.yml: service gateway).
#   docker build -t vlmq-worker .
#   docker run --gpus '"device=0"' -e VLMQ_REDIS_URL=redis://:pw@redis:6379/0 vlmq-worker
# Every setting is an environment variable VLMQ_<NAME> (worker/settings.py); see docs/operations.md.

ARG CUDA_TAG=12.4.1-cudnn
ARG UBUNTU=ubuntu22.04

# ---- build: a virtualenv with torch, the worker and gpu extras (flash-attn may compile here) ----
FROM nvidia/cuda:${CUDA_TAG}-devel-${UBUNTU} AS build
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MAX_JOBS=4
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
        build-essential git ninja-build \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3013
RUN pip install --upgrade pip setuptools wheel packaging \
    && pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
COPY gateway ./gateway
# flash-attn builds against the torch above: no build isolation (the project pins its own deps)
# hadolint ignore=DL3013
RUN pip install --no-build-isolation ".[worker,gpu,gateway]"

# ---- runtime: CUDA + cuDNN runtime, Python 3.11, the virtualenv, a non-root user ----
FROM nvidia/cuda:${CUDA_TAG}-runtime-${UBUNTU}
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/var/cache/huggingface \
    VLMQ_HEALTH_FILE=/tmp/vlmq-worker-health.json \
    VLMQ_METRICS_PORT=9464 \
    VLMQ_DEVICE=cuda:0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 ca-certificates \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin vlmq \
    && mkdir -p /var/cache/huggingface \
    && chown vlmq:vlmq /var/cache/huggingface
# downloaded model weights survive container restarts (mount a named volume here)
VOLUME ["/var/cache/huggingface"]
USER 10001:10001
WORKDIR /home/vlmq
EXPOSE 9464 8000
# consuming, not only alive: model loaded, broker up, heartbeat recent (worker/ops/health.py)
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["vlmq-worker", "health"]
ENTRYPOINT ["vlmq-worker"]
