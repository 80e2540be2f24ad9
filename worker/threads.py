"""The worker's threads under their own names for the operating system too, so that ``top -H``,
``ps -T``, ``py-spy`` and ``/proc/<pid>/task/*/comm`` tell the decode loop (``vlmq-generate``)
from preparation (``vlmq-prep_N``), the streamer, the heartbeat and the Celery task threads
(``vlmq-task``). Linux only (the kernel keeps 15 bytes); elsewhere nothing happens."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

PR_SET_NAME = 15  # prctl(2): name the calling thread
_named = threading.local()
_libc: ctypes.CDLL | None = None


def _prctl() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            return None
    return _libc


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (default: its Python name) at the OS level, once."""
    name = name or threading.current_thread().name
    if getattr(_named, "name", None) == name:
        return
    _named.name = name
    libc = _prctl()
    if libc is not None:
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def start_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """A started daemon thread running ``target`` under ``name`` (Python's and the OS's)."""
    def run() -> None:
        name_os_thread()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads are ``<name>_<n>`` for the OS too."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name,
                              initializer=name_os_thread)
