"""The contract for producers in other languages, generated from the code (``vlmq schema``).

``document()`` holds the JSON Schema of every wire document, with ``JobRequest`` as the worker
accepts it (the ``prompt``/``images`` shorthand included, image sources limited to the schemes
and counts the worker takes), the job id syntax, the record's fields (``producer.fields``), the
key names, and the cancel script. docs/PROTOCOL.md is checked against it by a test, and
docs/cancel.lua is ``cancel_lua()`` (``vlmq schema --cancel-lua``).
"""

from __future__ import annotations

import copy
from typing import Any

from producer import fields, keys, scripts, sources
from producer.answers import ErrorCode
from producer.schema import DEFAULT_LIMITS, request_json_schema

# the record's fields: what each holds (docs/PROTOCOL.md lists every one)
RECORD_FIELDS = {
    "id": "the job id", "status": "QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED or EXPIRED",
    "queue": "the broker queue its task message goes to", "model": "the request's model or ''",
    "request": "the JobRequest JSON", "created_at": "Unix time, seconds",
    "sent_at": "when its task message was last sent (the reconciler's clock)",
    "deadline_at": "created_at + ttl_s", "attempts": "claims so far", "fence": "the current "
    "claim's number", "tokens": "tokens generated", "started_at": "claimed at",
    "finished_at": "ended at (kept until a retry)", "worker": "the worker that claimed it",
    "lease_until": "the claim's lease", "cancel": "'1' once cancel was asked",
    "finish_reason": "stop, length, cancelled or deadline", "error": "ErrorInfo JSON",
    "result": "JobResult JSON", "result_uri": "s3://bucket/key of the JobResult JSON",
    "retries": "retries so far", "retried_at": "last retry", "signer": "signing certificate id",
    "sig": "record signature",
}
_IMAGE_SOURCE = r"^(?i:https?://|s3://|data:image/)"


def _request_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """JobRequest as the worker takes it: the shorthand, and image source limits."""
    out = copy.deepcopy(schema)
    limits = DEFAULT_LIMITS
    image = out.get("$defs", {}).get("ImagePart", {}).get("properties", {}).get("image")
    if image is not None:
        image.update(pattern=_IMAGE_SOURCE, maxLength=limits.max_source_chars)
    text = {"type": "string", "minLength": 1}  # a plain string is one text part
    message = out.get("$defs", {}).get("Message", {}).get("properties", {})
    if "content" in message:
        message["content"] = {"anyOf": [text, message["content"]]}
    for option in out["properties"].get("prompt_parts", {}).get("anyOf", []):
        if option.get("type") == "array":
            option["items"] = {"anyOf": [text, option["items"]]}
    source = {"type": "string", "pattern": _IMAGE_SOURCE, "maxLength": limits.max_source_chars}
    out["properties"]["prompt"] = {"type": "string", "minLength": 1,
                                   "maxLength": limits.max_text_chars,
                                   "description": "shorthand: one user message, images first"}
    out["properties"]["images"] = {"type": "array", "items": source,
                                   "maxItems": limits.max_images}
    out["oneOf"] = [{"required": ["messages"]}, {"required": ["prompt_parts"]},
                    {"required": ["prompt"]}]
    out["description"] = (f"{out.get('description', '')} At most {limits.max_images} images "
                          f"per job; image sources: {', '.join(sources.SCHEMES)} or data:.")
    return out


def cancel_lua() -> str:
    """The cancel script, as shipped in docs/cancel.lua (run with EVAL or SCRIPT LOAD/EVALSHA)."""
    return (
        "-- vlmq cancel (generated from producer/scripts.py CANCEL; `vlmq schema --cancel-lua`)\n"
        f"-- KEYS: {', '.join(keys.JOB_KEYS_DOC[:4])},\n"
        f"--       {', '.join(keys.JOB_KEYS_DOC[4:])}\n"
        "-- ARGV: id, now (Unix seconds), retention seconds (86400), stream maxlen (10000),\n"
        "--       queued_only ('1' leaves a RUNNING job alone, else '0'), and the cancelled\n"
        '--       event body without its closing brace: {"schema_version": 1, "job_id": "{id}",\n'
        '--       "type": "cancelled", "delta": "", "finish_reason": "cancelled"\n'
        "-- Returns {'cancelled'} (was QUEUED), {'requested'} (RUNNING: stops within two decode\n"
        "-- steps), {'running'} (left alone), {'ended', status} or {'missing'}.\n"
        + scripts.CANCEL.lua.lstrip("\n"))


def document() -> dict[str, Any]:
    found = request_json_schema()
    found["models"]["JobRequest"] = _request_schema(found["models"]["JobRequest"])
    found["job_id"] = {"type": "string", "pattern": keys.JOB_ID.pattern}
    found["record"] = {"key": keys.JOB_KEYS_DOC[0], "fields": RECORD_FIELDS,
                       "times": list(fields.TIMES), "counters": list(fields.COUNTERS)}
    found["error_codes"] = [code.value for code in ErrorCode]
    found["task"] = {"name": keys.TASK_GENERATE, "args": ["job id"], "kwargs": {},
                     "callbacks": None, "errbacks": None, "chain": None, "chord": None}
    found["cancel"] = {"script": "docs/cancel.lua", "keys": keys.JOB_KEYS_DOC}
    return found
