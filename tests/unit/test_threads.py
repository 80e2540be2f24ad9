"""Worker threads carry their names to the OS (what top -H, ps -T and /proc show)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from worker.threads import name_os_thread, pool, start_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="thread names at the OS level are read from /proc")


def os_name() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


def test_start_thread_names_the_os_thread() -> None:
    seen: list[str] = []
    start_thread(lambda: seen.append(os_name()), "vlmq-generate").join(timeout=10)
    assert seen == ["vlmq-generate"]


def test_pool_threads_are_named_with_their_number() -> None:
    with pool(1, "vlmq-prep") as executor:
        assert executor.submit(os_name).result(timeout=10) == "vlmq-prep_0"


def test_a_long_name_is_cut_to_what_the_kernel_keeps() -> None:
    seen: list[str] = []

    def run() -> None:
        name_os_thread("vlmq-a-name-longer-than-fifteen")
        seen.append(os_name())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=10)
    assert seen == ["vlmq-a-name-lon"]
