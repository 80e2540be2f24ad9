"""Fetching never blocks the queue, in-process on a loaded tiny model: jobs whose image host
never answers wait on the fetch pool while jobs with local (data:) images go through; a deadline
that passes during a fetch ends the job EXPIRED, whatever the source. The hanging hosts are
loopback sockets that accept and never answer."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import make_image

pytestmark = pytest.mark.integration
PROMPT = "What is it?"


@pytest.fixture()
def hanging() -> Iterator[Callable[[], str]]:
    """``hanging()``: the URL of an image on a new host that accepts and never answers."""
    opened: list[socket.socket] = []

    def make() -> str:
        server = socket.create_server(("127.0.0.1", 0), backlog=64)
        opened.append(server)
        return f"http://127.0.0.1:{server.getsockname()[1]}/img.png"

    yield make
    for server in opened:
        server.close()


def make_harness(engine: Any, image_server: Any, urls: list[str], **settings: Any) -> Any:
    ports = [image_server.port, *(int(u.split(":")[2].split("/")[0]) for u in urls)]
    return engine("qwen2_vl", fetch_read_timeout_s=60, fetch_total_timeout_s=60,
                  allowed_ports=ports, **settings)


def data_uri(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(make_image(32, 32, seed)).decode()


def run_data_jobs(harness: Any, count: int) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    works = [harness.submit(harness.work(prompt=PROMPT, images=[data_uri(i)], max_new_tokens=2))
             for i in range(count)]
    for work in works:
        work.future.result(120)
    return time.perf_counter() - started, works


def test_data_jobs_are_never_behind_hanging_hosts(engine: Any, hanging: Callable[[], str],
                                                  image_server: Any) -> None:
    hosts = [hanging(), hanging()]
    harness = make_harness(engine, image_server, hosts)
    run_data_jobs(harness, 2)  # warm up
    alone, _ = run_data_jobs(harness, 10)
    stuck = [harness.submit(harness.work(prompt=PROMPT, images=[url], max_new_tokens=2))
             for url in hosts]
    time.sleep(0.5)  # both are fetching by now
    behind, works = run_data_jobs(harness, 10)
    assert all(work.future.result().finish_reason == "length" for work in works)
    assert not any(work.future.done() for work in stuck)  # still fetching: never in the way
    assert behind < 5 * alone + 1.0, (behind, alone)  # the time they take alone, not 60 s


def test_a_deadline_during_the_fetch_ends_expired(engine: Any, hanging: Callable[[], str],
                                                  image_server: Any) -> None:
    url = hanging()
    harness = make_harness(engine, image_server, [url])
    work = harness.submit(harness.work(deadline=time.time() + 1.0, prompt=PROMPT,
                                       images=[url], max_new_tokens=2))
    assert work.future.result(30).finish_reason == "deadline"


def test_fetches_per_host_are_limited(engine: Any, hanging: Callable[[], str],
                                      image_server: Any) -> None:
    """One host holds at most ``fetch_per_host`` fetches; a job on another host goes on."""
    url = hanging()
    harness = make_harness(engine, image_server, [url], fetch_per_host=1, fetch_jobs=3)
    first = harness.submit(harness.work(prompt=PROMPT, images=[url], max_new_tokens=2))
    time.sleep(0.3)
    second = harness.submit(harness.work(deadline=time.time() + 1.0, prompt=PROMPT,
                                         images=[url], max_new_tokens=2))
    other = harness.submit(harness.work(prompt=PROMPT, images=[image_server.url("/cats.png")],
                                        max_new_tokens=2))
    assert other.future.result(60).finish_reason == "length"
    assert second.future.result(30).finish_reason == "deadline"  # waited for the host's slot
    assert not first.future.done()
