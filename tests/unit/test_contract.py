"""The generated contract (``vlmq schema``) against what the worker accepts and against
docs/PROTOCOL.md and docs/cancel.lua."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from producer import contract, keys
from producer.schema import JobRequest

DOCS = Path(__file__).resolve().parents[2] / "docs"
PNG = "data:image/png;base64,iVBORw0KGgo="


def schema_accepts(document: dict[str, Any]) -> bool:
    full = contract.document()["models"]["JobRequest"]
    try:
        jsonschema.validate(document, full)
    except jsonschema.ValidationError:
        return False
    return True


def worker_accepts(document: dict[str, Any]) -> bool:
    try:
        JobRequest.model_validate_json(json.dumps(document))
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("document", [
    {"prompt": "hi"},
    {"prompt": "hi", "images": ["https://example.com/a.png", "s3://bucket/key.png"]},
    {"messages": [{"role": "user", "content": "hi"}]},
    {"prompt_parts": ["Describe", {"type": "image", "image": "https://example.com/a.png"}]},
    {"prompt": "hi", "images": ["https://example.com/a.png"] * 20},
    {"prompt": "hi", "images": ["file:///etc/passwd"]},
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "file:///etc/x"},
                                               {"type": "text", "text": "hi"}]}]},
    {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
    {},
    {"prompt": "hi", "surprise": 1},
], ids=["prompt", "shorthand", "messages", "prompt-parts", "20-images", "file-shorthand",
        "file-message", "two-forms", "empty", "unknown-field"])
def test_the_schema_accepts_what_the_worker_accepts(document: dict[str, Any]) -> None:
    assert schema_accepts(document) == worker_accepts(document), document


def test_protocol_lists_every_record_field_error_code_and_request_field() -> None:
    doc = (DOCS / "PROTOCOL.md").read_text()
    found = contract.document()
    missing = [name for name in found["record"]["fields"] if f"`{name}`" not in doc]
    assert not missing, f"record fields not in PROTOCOL.md: {missing}"
    codes = [code for code in found["error_codes"] if f"| `{code}` |" not in doc]
    assert not codes, f"error codes not in PROTOCOL.md's table: {codes}"
    table = set(re.findall(r"^\| `([A-Z_]+)` \| (?:yes|no)", doc, re.M))
    assert table == set(found["error_codes"])
    example = json.loads(re.search(r"## JobRequest.*?```json\n(.*?)```", doc, re.S).group(1))
    properties = set(found["models"]["JobRequest"]["properties"]) - {"prompt", "images"}
    assert set(example) | {"prompt_parts"} == properties
    assert "`A-Z a-z 0-9 _ -`" in doc and found["job_id"]["pattern"] == keys.JOB_ID.pattern


def test_the_shipped_cancel_script_is_the_ledgers() -> None:
    assert (DOCS / "cancel.lua").read_text() == contract.cancel_lua()


def test_every_cli_exit_code_is_in_its_help_and_the_readme() -> None:
    from producer import cli

    help_text = " ".join(cli._parser().format_help().split())
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    for _kinds, code, _prefix in cli._EXITS:
        assert f" {code} " in help_text.split("Exit codes:")[1], code
        assert f" {code} " in readme.split("Exit codes:")[1], code
