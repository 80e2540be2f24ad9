"""What a ledger Redis crash loses, measured: ``python -m tests.integration.durability``.

For each setting, one client writes job records (``Ledger.create``, one acknowledged write at a
time, as producers do) as fast as it can; after ``--seconds`` the Redis primary is SIGKILLed
mid-stream. Then the records are read back (from the restarted primary's AOF, or from the
replica for ``replica+WAIT``) and every acknowledged record that is missing is counted."""

from __future__ import annotations

import argparse
import signal
import threading
import time
import uuid

import redis

from producer import keys
from producer.client import build_request
from producer.jobs import Ledger, connect
from tests.servers import RedisServer


def _write_until_killed(ledger: Ledger, server: RedisServer, seconds: float,
                        wait_replica: bool) -> list[str]:
    acked: list[str] = []
    request = build_request(prompt="hi")
    assert server.proc is not None
    killer = threading.Timer(seconds, server.proc.send_signal, (signal.SIGKILL,))
    killer.start()
    plain = redis.Redis(port=server.port, socket_timeout=2)
    try:
        while True:
            job_id = uuid.uuid4().hex
            ledger.create(job_id, request, "vlmq.durability")
            if wait_replica and int(plain.execute_command("WAIT", 1, 1000)) < 1:
                continue  # not on the replica: not acknowledged under this setting
            acked.append(job_id)
    except redis.RedisError:
        return acked
    finally:
        killer.join()
        plain.close()


def measure(setting: str, seconds: float) -> dict[str, float]:
    fsync = {"everysec": "everysec", "always": "always", "replica+WAIT": "everysec"}[setting]
    primary = RedisServer("--appendonly", "yes", "--appendfsync", fsync)
    replica = (RedisServer("--replicaof", "127.0.0.1", str(primary.port))
               if setting == "replica+WAIT" else None)
    try:
        if replica is not None:
            probe = redis.Redis(port=replica.port)
            while probe.info("replication").get("master_link_status") != "up":
                time.sleep(0.05)
        ledger = Ledger(connect(f"redis://127.0.0.1:{primary.port}/0"))
        started = time.monotonic()
        acked = _write_until_killed(ledger, primary, seconds, replica is not None)
        elapsed = time.monotonic() - started
        assert primary.proc is not None
        primary.proc.wait(10)
        if replica is None:
            primary.start()  # from its AOF
            reader = redis.Redis(port=primary.port)
        else:
            reader = redis.Redis(port=replica.port)  # what a failover would promote
        found = reader.pipeline(transaction=False)
        for job_id in acked:
            found.exists(keys.job_key(job_id))
        lost = len(acked) - sum(found.execute())
        return {"acknowledged": len(acked), "lost": lost,
                "writes_per_s": round(len(acked) / elapsed), "lost_ms_of_writes":
                round(1000 * lost / max(1, len(acked)) * elapsed, 1)}
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for setting in ("everysec", "always", "replica+WAIT"):
        for run in range(args.runs):
            print(setting, run + 1, measure(setting, args.seconds), flush=True)


if __name__ == "__main__":
    main()
