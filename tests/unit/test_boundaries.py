"""The boundaries the layout promises, checked on the source: one door to the ledger's keys,
two producers with the same face, and a worker that never imports the client face."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from producer.aio import AsyncProducer
from producer.client import Producer

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for top in ("producer", "worker", "demo", "bench", "gateway")
                 for p in (ROOT / top).rglob("*.py"))
LEDGER = {"producer/keys.py", "producer/records.py", "producer/scripts.py", "producer/jobs.py"}
# the job's keys, the indexes, and the helpers that name them
KEY_NAMES = re.compile(r"vlmq:(job|stream|index)|\b(job_key|stream_key|attempts_key|job_keys|"
                       r"token_channel)\(|\b(QUEUED|RUNNING|TERMINAL)_INDEX\b")
# raw hash, stream and sorted-set commands, as methods or as command names
RAW_CALLS = re.compile(
    r"\.(hget|hset|hgetall|hmget|hdel|hincrby|hsetnx|xadd|xrange|xrevrange|xread|xreadgroup|"
    r"xlen|xtrim|zadd|zrange|zrangebyscore|zrevrange|zrevrangebyscore|zrem|zcard|zscore|"
    r"zremrangebyscore)\(|[\"'](HGET|HSET|HGETALL|HMGET|HDEL|XADD|XRANGE|XREVRANGE|XREAD|ZADD|"
    r"ZRANGE|ZRANGEBYSCORE|ZREVRANGE|ZREM|ZCARD|ZSCORE)[\"']")
# kombu's own keys on a Redis broker (queue lists, the unacked hash and its index)
BROKER = {"producer/broker.py"}


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _code(path: Path) -> str:
    """The source without comments and docstrings (which may name keys to explain them)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_the_sources_are_found() -> None:
    names = {_relative(p) for p in SOURCES}
    assert LEDGER | BROKER | {"worker/tasks.py", "producer/core.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_only_the_ledger_touches_job_keys_streams_and_indexes(path: Path) -> None:
    name = _relative(path)
    if name in LEDGER:
        return
    code = _code(path)
    assert not KEY_NAMES.findall(code), f"{name} names ledger keys: go through the Ledger"
    if name not in BROKER:
        found = [m.group(0) for m in RAW_CALLS.finditer(code)]
        assert not found, f"{name} makes raw Redis calls {found}: go through the Ledger"


def test_lua_gets_every_key_as_keys() -> None:
    from producer import scripts

    for script in vars(scripts).values():
        if isinstance(script, scripts.Script):
            assert "vlmq" not in script.lua, script.name


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_worker_never_imports_the_client_face() -> None:
    worker = [p for p in SOURCES if _relative(p).startswith("worker/")]
    assert worker
    for path in worker:
        bad = {name for name in _imports(path) if name.startswith(
            ("producer.client", "producer.aio", "producer.core", "producer.Producer",
             "producer.AsyncProducer"))}
        assert not bad, f"{_relative(path)} imports {bad}"


def _face(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(cls).items()
            if not name.startswith("_") and callable(member)}


def _normal(signature: inspect.Signature) -> str:
    """The signature with the transport's return types made alike (Iterator ~ AsyncIterator)."""
    return str(signature).replace("AsyncIterator", "Iterator")


def test_both_producers_have_the_same_methods_and_signatures() -> None:
    sync, aio = _face(Producer), _face(AsyncProducer)
    assert sorted(sync) == sorted(aio), set(sync) ^ set(aio)
    assert {"submit", "status", "wait", "result", "result_url", "cancel", "stream", "stats",
            "jobs", "retry", "purge", "enqueue", "queue_depth", "workers"} <= set(sync)
    for name in sync:
        assert _normal(sync[name]) == _normal(aio[name]), name
    assert inspect.signature(Producer.__init__) == inspect.signature(AsyncProducer.__init__)
    for name in aio:
        member = getattr(AsyncProducer, name)
        assert inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member), name
