"""The worker's one error tree. Each class names its stable code and whether a retry may help.

Everything raised while serving a job is either one of these, or is turned into one in
``worker.tasks`` (the one place that maps exceptions to job outcomes and to Celery).
"""

from __future__ import annotations

from producer.schema import ErrorCode, ErrorInfo


class JobError(Exception):
    """A job failed for a reason the producer should see."""

    code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, message=self.message, retryable=self.retryable)


class InvalidRequest(JobError):
    """The job record or its request does not match the contract."""

    code = ErrorCode.INVALID_REQUEST


class InvalidPrompt(JobError):
    """The prompt cannot be given to this model (for example it holds control tokens)."""

    code = ErrorCode.INVALID_PROMPT


class PromptTooLong(JobError):
    """Prompt plus images do not fit the model's context or the worker's token cap."""

    code = ErrorCode.PROMPT_TOO_LONG


class ImageFetchFailed(JobError):
    """An image could not be fetched (network error, 5xx); usually worth a retry."""

    code = ErrorCode.IMAGE_FETCH_FAILED
    retryable = True


class ImageFetchTimeout(JobError):
    """Fetching an image ran past its connect, read or total timeout."""

    code = ErrorCode.IMAGE_FETCH_TIMEOUT
    retryable = True


class ImageNotFound(JobError):
    """The image source answered that it does not exist (404, 410, missing S3 key)."""

    code = ErrorCode.IMAGE_NOT_FOUND


class ImageUrlForbidden(JobError):
    """The image source is not allowed: scheme, port, host list or a non-public address."""

    code = ErrorCode.IMAGE_URL_FORBIDDEN


class ImageTooLarge(JobError):
    """The image's bytes or pixels exceed the configured caps."""

    code = ErrorCode.IMAGE_TOO_LARGE


class ImageUnsupportedFormat(JobError):
    """The bytes are not one of the allowed image formats."""

    code = ErrorCode.IMAGE_UNSUPPORTED_FORMAT


class ImageInvalid(JobError):
    """The bytes claim an allowed format but do not decode (truncated, corrupt, empty)."""

    code = ErrorCode.IMAGE_INVALID


class ResourceExhausted(JobError):
    """The request does not fit in memory even alone."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class ResultStoreFailed(JobError):
    """The result could not be written to its store."""

    code = ErrorCode.RESULT_STORE_FAILED
    retryable = True


class ModelError(JobError):
    """The model or processor raised while handling this request."""

    code = ErrorCode.MODEL_ERROR
