"""Memory figures, recycling watermarks and sticky CUDA errors.

``over_watermark(settings)`` is called by the worker's heartbeat: when the host RSS or the GPU
memory reserved by torch's caching allocator passes its watermark (``VLMQ_MAX_RSS_MB``,
``VLMQ_MAX_GPU_RESERVED_MB``; 0 = off), the worker shuts down warm and exits with
``RECYCLE_EXIT`` so its supervisor (or container) starts a fresh process.

``is_sticky_cuda_error(exc)`` tells the errors after which the process's CUDA context is
unusable (illegal address, launch failure, device-side assert, ...): every later CUDA call
fails too, so the process must exit (``STICKY_CUDA_EXIT``) and the job be retried elsewhere.
Out-of-memory is not sticky.
"""

from __future__ import annotations

import os
import resource
import sys

import torch

from worker.settings import WorkerSettings

MB = 2**20
RECYCLE_EXIT = 75  # EX_TEMPFAIL: the worker recycled itself; start it again
STICKY_CUDA_EXIT = 70  # EX_SOFTWARE: the CUDA context is broken; start a fresh process

STICKY_CUDA_MESSAGES = (
    "illegal memory access",
    "illegal address",
    "unspecified launch failure",
    "launch failure",
    "device-side assert",
    "misaligned address",
    "illegal instruction",
    "invalid program counter",
    "hardware stack error",
    "launch timed out",
    "uncorrectable ecc error",
    "cudaerrorillegaladdress",
    "cudaerrorlaunchfailure",
    "cudaerrorassert",
    "cublas_status_execution_failed",
)
CUDA_WORDS = ("cuda", "cublas", "cudnn", "accelerator")


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def cuda_index(device: str) -> int | None:
    """The CUDA device index a worker setting names (``auto`` = 0), or None for the CPU."""
    if device == "cpu" or not torch.cuda.is_available():
        return None
    if device in ("auto", "cuda"):
        return 0
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    return None


def gpu_memory(index: int | None) -> dict[str, float]:
    """Allocated / reserved MB on CUDA device ``index``; empty when off CUDA or not started."""
    if index is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {
        "gpu_allocated_mb": round(torch.cuda.memory_allocated(index) / MB, 1),
        "gpu_reserved_mb": round(torch.cuda.memory_reserved(index) / MB, 1),
    }


def over_watermark(settings: WorkerSettings) -> str | None:
    """Why this process should be recycled now, or None while under its watermarks."""
    if settings.max_rss_mb:
        rss_mb = rss_bytes() / MB
        if rss_mb > settings.max_rss_mb:
            return f"host RSS {rss_mb:.0f} MB is over VLMQ_MAX_RSS_MB={settings.max_rss_mb}"
    if settings.max_gpu_reserved_mb:
        reserved = gpu_memory(cuda_index(settings.device)).get("gpu_reserved_mb", 0.0)
        if reserved > settings.max_gpu_reserved_mb:
            return (f"GPU reserved memory {reserved:.0f} MB is over "
                    f"VLMQ_MAX_GPU_RESERVED_MB={settings.max_gpu_reserved_mb}")
    return None


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) leaves the CUDA context broken."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).lower()
        from_cuda = isinstance(current, torch.AcceleratorError) or any(
            word in text for word in CUDA_WORDS)
        if (from_cuda and not isinstance(current, torch.OutOfMemoryError)
                and any(message in text for message in STICKY_CUDA_MESSAGES)):
            return True
        current = current.__cause__ or current.__context__
    return False
