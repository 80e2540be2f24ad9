"""The Node.js example in docs/PROTOCOL.md, run as it stands against a real redis-server when
``node`` and the ``redis`` package (``NODE_PATH``) are there: the job it submits is a job the
Python producer reads, its message is the task a worker takes, and the shipped cancel script
ends it with a terminal event on the stream."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

pytestmark = pytest.mark.integration
DOCS = Path(__file__).resolve().parents[2] / "docs"


def node_with_redis() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    probe = subprocess.run([node, "-e", "require('redis')"], capture_output=True, timeout=30)
    return node if probe.returncode == 0 else None


@pytest.mark.skipif(node_with_redis() is None, reason="needs node and the redis package "
                    "(npm install redis; NODE_PATH)")
def test_the_node_example_submits_polls_cancels_and_streams(producer: Any, redis_server: Any,
                                                            tmp_path: Path) -> None:
    doc = (DOCS / "PROTOCOL.md").read_text()
    found = re.search(r"```js\n(.*?)```", doc, re.S)
    assert found is not None
    script = tmp_path / "example.js"
    script.write_text(found.group(1))
    env = dict(os.environ, REDIS_URL=redis_server.url, VLMQ_CANCEL_LUA=str(DOCS / "cancel.lua"))
    done = subprocess.run([str(node_with_redis()), str(script)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    job_id = lines[0].split()[1]
    assert lines[1:3] == ["status QUEUED", "cancel cancelled"]
    assert lines[-1] == "end 0 cancelled cancelled"
    state = producer.status(job_id)
    assert state.status == "CANCELLED" and state.queue == "vlmq"
    client = redis.Redis.from_url(redis_server.url)
    messages = [json.loads(m) for m in client.lrange("vlmq", 0, -1)]
    mine = [m for m in messages if m["headers"]["id"] == job_id]
    assert len(mine) == 1 and mine[0]["headers"]["task"] == "vlmq.generate"
    assert json.loads(base64.b64decode(mine[0]["body"]))[0] == [job_id]
