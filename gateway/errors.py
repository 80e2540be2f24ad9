"""Errors the gateway answers with, in OpenAI's error shape on every route:
``{"error": {"message", "type", "param", "code"}}`` (plus ``details`` with field paths for
requests that break the contract), so OpenAI clients raise their usual exceptions."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from producer.errors import InvalidRequestError
from producer.schema import ErrorCode, ErrorInfo

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "overloaded_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, retry_after: float | None = None,
                 details: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.details = details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message,
                                 "type": _TYPES.get(self.status, "server_error"),
                                 "param": self.param, "code": self.code}
        if self.details:
            error["details"] = self.details
        return {"error": error}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after + 0.499)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(error: InvalidRequestError, prefix: str = "") -> ApiError:
    """The producer's validation error, with its field paths, as a 400."""
    details = [{"path": f"{prefix}{path}" if path else prefix.rstrip("."), "reason": reason}
               for path, reason in error.problems]
    first = details[0]["path"] if details else None
    return ApiError(400, str(error), code="invalid_request", param=first or None,
                    details=details)


def unsupported(param: str, why: str = "") -> ApiError:
    return ApiError(400, f"'{param}' is not supported by this server{why}",
                    code="unsupported_parameter", param=param)


def not_found(job_id: str) -> ApiError:
    return ApiError(404, f"no job {job_id!r} (unknown, or its record has expired)",
                    code="job_not_found", param="job_id")


_CLIENT_CODES = {ErrorCode.INVALID_REQUEST, ErrorCode.INVALID_PROMPT, ErrorCode.PROMPT_TOO_LONG,
                 ErrorCode.IMAGE_FETCH_FAILED, ErrorCode.IMAGE_FETCH_TIMEOUT,
                 ErrorCode.IMAGE_NOT_FOUND, ErrorCode.IMAGE_URL_FORBIDDEN,
                 ErrorCode.IMAGE_TOO_LARGE, ErrorCode.IMAGE_UNSUPPORTED_FORMAT,
                 ErrorCode.IMAGE_INVALID}


def job_failed(info: ErrorInfo) -> ApiError:
    """A worker-side failure: the client's input (400), capacity (503), else the server (500)."""
    if info.code in _CLIENT_CODES:
        status = 400
    elif info.code == ErrorCode.RESOURCE_EXHAUSTED:
        status = 503
    else:
        status = 500
    return ApiError(status, info.message, code=info.code.value.lower())
