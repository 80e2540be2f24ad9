"""`vlmq-worker --gpus 0,1,... | all`: one worker process per GPU, supervised.

Each child is a fresh ``python -m worker`` with the same options, ``--device cuda:0`` and
``CUDA_VISIBLE_DEVICES=<gpu>`` set in its environment before it starts (so before torch is
imported there). Every child consumes the same queues. This process never imports torch nor
touches CUDA: ``all`` counts GPUs with ``nvidia-smi -L`` (else ``/proc/driver/nvidia/gpus``),
or takes the ids in this process's own ``CUDA_VISIBLE_DEVICES`` when that is set.

Supervision: a child that exits is started again after a backoff (1 s, doubling to 30 s while
children keep dying within a minute of their start; back to 1 s after a child ran a minute). A
child that exits with code 2 (it cannot start with these settings) is not restarted; when no
child is left the supervisor exits 2. SIGTERM or SIGINT: SIGTERM to every child (each hands its
jobs in hand back and exits), wait ``VLMQ_STOP_GRACE_S``, then SIGKILL; a second signal kills at
once. Children live in their own process group and get SIGTERM if the supervisor dies (Linux).

Per child: ``--hostname H`` becomes ``H-gpu<N>``, the metrics port ``VLMQ_METRICS_PORT + i``
and the health file ``<stem>.gpu<N><suffix>``. ``VLMQ_SUPERVISOR_CHILD_DEVICE`` (default
``cuda:0``) is for tests only: ``cpu`` lets the children run on a machine without GPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from worker.settings import WorkerSettings

log = logging.getLogger("vlmq.supervisor")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0
POLL_S = 0.2
CANNOT_START = 2
PROC_GPUS = Path("/proc/driver/nvidia/gpus")
STRIPPED = ("--gpus", "--device", "--hostname")  # options the supervisor sets per child
PR_SET_PDEATHSIG = 1


class SupervisorError(Exception):
    """The GPU list cannot be resolved; the message says why."""


def nvidia_smi_listing() -> str | None:
    """``nvidia-smi -L`` output, or None when it is missing or fails."""
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20,
                              check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def discover_gpus(listing: str | None, proc_dir: Path = PROC_GPUS) -> list[str]:
    """GPU indices from an ``nvidia-smi -L`` listing, else from the driver's /proc entries."""
    if listing:
        ids = [line.split(":", 1)[0].split()[1] for line in listing.splitlines()
               if line.startswith("GPU ") and ":" in line]
        if ids:
            return ids
    if proc_dir.is_dir():
        return [str(i) for i in range(sum(1 for _ in proc_dir.iterdir()))]
    return []


def resolve_gpus(spec: str, visible: str | None,
                 discover: Callable[[], list[str]]) -> list[str]:
    """The GPU ids to pin children to: ``spec`` is ``all`` or a comma-separated id list."""
    spec = spec.strip()
    if spec == "all":
        if visible is not None:
            ids = [item.strip() for item in visible.split(",") if item.strip()]
            where = f"CUDA_VISIBLE_DEVICES={visible!r}"
        else:
            ids = discover()
            where = "nvidia-smi -L and /proc/driver/nvidia/gpus"
        if not ids:
            raise SupervisorError(f"--gpus all: no NVIDIA GPU found ({where} list none)")
        return ids
    ids = [item.strip() for item in spec.split(",")]
    for item in ids:
        if not (item.isdigit() or item.startswith(("GPU-", "MIG-"))):
            raise SupervisorError(f"--gpus {spec!r}: {item!r} is not a GPU index or UUID "
                                  "(use e.g. 0,1 or all)")
    if len(set(ids)) != len(ids):
        raise SupervisorError(f"--gpus {spec!r} names a GPU twice")
    return ids


def child_argv(argv: list[str], child_device: str, hostname: str | None, gpu: str) -> list[str]:
    """The worker options for one child: ours, less --gpus/--device/--hostname, plus its own."""
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        if token.split("=", 1)[0] in STRIPPED:
            skip = "=" not in token
            continue
        out.append(token)
    out += ["--device", child_device, "--gpus="]  # last wins: a child never supervises
    if hostname:
        out += ["--hostname", f"{hostname}-gpu{gpu}"]
    return out


def child_env(settings: WorkerSettings, gpu: str, index: int) -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
    env.pop("VLMQ_GPUS", None)
    if settings.metrics_port:
        env["VLMQ_METRICS_PORT"] = str(settings.metrics_port + index)
    health = Path(settings.health_file)
    env["VLMQ_HEALTH_FILE"] = str(health.with_name(f"{health.stem}.gpu{gpu}{health.suffix}"))
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


@dataclass
class Child:
    gpu: str
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = BACKOFF_START_S
    restart_at: float | None = None
    retired: bool = False


class Supervisor:
    def __init__(self, settings: WorkerSettings, argv: list[str], gpus: list[str],
                 *, capture: bool = False) -> None:
        self.settings = settings
        self.argv = argv
        self.capture = capture  # --check: collect each child's report from its stdout
        self.children = [Child(gpu, i) for i, gpu in enumerate(gpus)]
        self.stopping = False
        self.force = False

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            self.force = True
        self.stopping = True
        log.info("%s: stopping %d children", signal.Signals(signum).name, len(self.children))
        if self.capture:  # --check waits in communicate(): pass the signal on at once
            for child in self.children:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGKILL if self.force else signal.SIGTERM)

    def start(self, child: Child) -> None:
        args = child_argv(self.argv, self.settings.supervisor_child_device,
                          self.settings.hostname, child.gpu)
        child.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            env=child_env(self.settings, child.gpu, child.index), process_group=0,
            preexec_fn=_die_with_parent, stdout=subprocess.PIPE if self.capture else None)
        child.started, child.restart_at = time.monotonic(), None
        log.info("child gpu=%s pid=%d started (CUDA_VISIBLE_DEVICES=%s)", child.gpu,
                 child.proc.pid, child.gpu)

    def reap(self, child: Child, code: int) -> None:
        lived = time.monotonic() - child.started
        pid = child.proc.pid if child.proc else 0
        child.proc = None
        if code == CANNOT_START:
            child.retired = True
            log.error("child gpu=%s pid=%d cannot start (exit 2); not restarting it", child.gpu,
                      pid)
            return
        if lived >= STABLE_S:
            child.backoff = BACKOFF_START_S
        delay, child.backoff = child.backoff, min(child.backoff * 2, BACKOFF_MAX_S)
        child.restart_at = time.monotonic() + delay
        log.warning("child gpu=%s pid=%d exited with %s after %.1fs; restarting in %.1fs",
                    child.gpu, pid, _exit_text(code), lived, delay)

    def run(self) -> int:
        for child in self.children:
            self.start(child)
        while not self.stopping:
            for child in self.children:
                if child.proc is not None and (code := child.proc.poll()) is not None:
                    self.reap(child, code)
                if child.restart_at is not None and time.monotonic() >= child.restart_at:
                    self.start(child)
            if all(child.retired for child in self.children):
                log.error("no child can start; giving up")
                self.stop()
                return CANNOT_START
            time.sleep(POLL_S)
        self.stop()
        return 0

    def check(self) -> int:
        """Start every child with --check, collect the reports, return the first failure."""
        for child in self.children:
            self.start(child)
        reports: dict[str, object] = {}
        worst = 0
        for child in self.children:
            assert child.proc is not None
            out, _ = child.proc.communicate()
            code = child.proc.returncode
            text = out.decode(errors="replace").strip()
            try:
                reports[child.gpu] = {**json.loads(text), "exit": code}
            except (ValueError, TypeError):
                reports[child.gpu] = {"exit": code, "output": text[-2000:]}
            worst = worst or code
        print(json.dumps({"gpus": reports}, indent=2), flush=True)
        return worst

    def stop(self) -> None:
        alive = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.stop_grace_s
        while not self.force and time.monotonic() < deadline:
            if all(proc.poll() is not None for proc in alive):
                break
            time.sleep(POLL_S)
        for proc in alive:
            if proc.poll() is None:
                log.warning("child pid=%d still running after SIGTERM; killing it", proc.pid)
                proc.kill()
            proc.wait()
        log.info("all children stopped")


def supervise(settings: WorkerSettings, argv: list[str], *, check: bool = False) -> int:
    """Run one worker per GPU of ``settings.gpus`` until SIGTERM/SIGINT; return the exit code."""
    try:
        gpus = resolve_gpus(settings.gpus or "", os.environ.get("CUDA_VISIBLE_DEVICES"),
                            lambda: discover_gpus(nvidia_smi_listing()))
    except SupervisorError as error:
        print(f"vlmq-worker: cannot start: {error}", file=sys.stderr)
        return CANNOT_START
    supervisor = Supervisor(settings, argv, gpus, capture=check)
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    log.info("supervising %d workers on GPUs %s", len(gpus), ",".join(gpus))
    return supervisor.check() if check else supervisor.run()
