"""Worker logging from the settings: plain lines or one JSON object per line, never a secret.

``setup(settings)`` installs one stderr handler on the root logger. Every line (message and
traceback) goes through ``redact``: passwords in URLs become ``***`` and ``data:`` URIs keep only
their media type and length, so neither secrets nor image bytes reach the logs. Job state changes
are logged by ``worker.tasks`` with ``extra={"job_id": ..., "status": ...}``; the JSON format
puts those fields on the object, and a dict given as ``extra={"fields": {...}}`` too (the plain
format appends it as ``key=value`` pairs).

Everything else goes through the same handler: Python warnings (``logging.captureWarnings``,
e.g. Celery's SecurityWarning) and the banners Celery writes straight to the terminal on a
signal ("worker: Warm shutdown (MainProcess)"), so ``VLMQ_LOG_FORMAT=json`` gives one JSON object
per line, whoever wrote it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from worker.settings import WorkerSettings

_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]*):"
                           r"(?P<password>[^@/\s]+)@")
_DATA_URI = re.compile(r"data:(?P<type>[\w.+/-]*)(?P<params>(?:;[\w=.-]+)*),"
                       r"(?P<payload>[A-Za-z0-9+/=%_-]*)")
_FIELDS = ("job_id", "status", "code", "attempt", "fence", "queue", "worker")
_QUIET = ("celery.worker.strategy", "celery.app.trace")  # per-task lines, repeated by vlmq's
ANNOUNCE = "vlmq.announce"  # lines scripts wait on ("vlmq-worker: ready: ..."): always shown


def redact(text: str) -> str:
    """Mask URL passwords and shorten data: URIs to ``data:<type>;base64,<N chars>``."""
    text = _URL_USERINFO.sub(r"\g<scheme>\g<user>:***@", text)
    return _DATA_URI.sub(
        lambda m: f"data:{m['type']}{m['params']},<{len(m['payload'])} chars>", text)


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = " ".join(f"{key}={value}" for key, value in _extra_fields(record).items())
        return redact(f"{line} {pairs}" if pairs else line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the job fields given as ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in _extra_fields(record).items():
            data.setdefault(key, redact(value) if isinstance(value, str) else value)
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            data["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(data, ensure_ascii=False, default=str)


def _celery_banner(msg: str, f: Any = None) -> None:
    """Stands in for Celery's ``safe_say`` (its terminal banners on a signal)."""
    logging.getLogger("celery.worker").info("%s", msg.strip())


def setup(settings: WorkerSettings) -> None:
    """Route every logger through one redacting stderr handler in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    level = settings.log_level.upper()
    root.setLevel(level)
    if level != "DEBUG":
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    announce = logging.getLogger(ANNOUNCE)
    announce.setLevel(logging.INFO)  # the ready line is printed whatever the level
    from celery.apps import worker as celery_worker  # celery is loaded by every worker anyway

    celery_worker.safe_say = _celery_banner  # type: ignore[assignment]
