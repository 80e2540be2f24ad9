"""The fleet's queue gauges in Prometheus' text format (``vlmq stats --prometheus``), from
``backlog()``: the same names and labels the workers' ``/metrics`` export."""

from __future__ import annotations

from typing import Any

GAUGES = (
    ("vlmq_queue_depth", "depth", "Messages waiting in the model's broker queue"),
    ("vlmq_queued_jobs", "queued", "QUEUED jobs the ledger records for the model's queue"),
    ("vlmq_oldest_queued_age_seconds", "oldest_age_s",
     "Age of the model's oldest QUEUED job (0 when none)"),
)


def model_of(queue: str) -> str:
    """The label for a queue: the model it serves (``vlmq.<model>``), or the queue's name."""
    return queue.split(".", 1)[1] if queue.startswith("vlmq.") else queue


def samples(backlog: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, float]]:
    """(metric, help, model, value) for each queue and gauge; a depth the broker cannot say
    is left out."""
    out = []
    for name, key, help_text in GAUGES:
        for queue, row in sorted(backlog.items()):
            if row.get(key) is not None:
                out.append((name, help_text, model_of(queue), float(row[key])))
    return out


def render(backlog: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    seen: set[str] = set()
    for name, help_text, model, value in samples(backlog):
        if name not in seen:
            seen.add(name)
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        escaped = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lines.append(f'{name}{{model="{escaped}"}} {value}')
    return "\n".join(lines) + "\n"
