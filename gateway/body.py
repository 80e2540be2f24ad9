"""Reading a JSON body within limits: a size cap (before anything is parsed) and a depth cap."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from gateway.errors import ApiError


async def read_json(request: Request, max_bytes: int, max_depth: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks) or b"null")
    except RecursionError:
        raise _too_deep(max_depth) from None
    except ValueError as error:
        raise ApiError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
    if depth(data, max_depth) > max_depth:
        raise _too_deep(max_depth)
    return data


def depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0); stops counting past ``limit``."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level + 1)
        if deepest > limit:
            return deepest
        todo.extend((child, level + 1) for child in children)
    return deepest


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the body is larger than {max_bytes} bytes", code="body_too_large")


def _too_deep(max_depth: int) -> ApiError:
    return ApiError(400, f"the JSON is nested deeper than {max_depth} levels",
                    code="json_too_deep")
