"""OpenAI's error object and the HTTP status of every way a request can fail.

Every failure a client sees is ``{"error": {"message", "type", "param", "code"}}`` with the
status OpenAI (and vLLM's OpenAI server) gives it; the daemon's typed error codes map onto them
here, in one table, so a new code is one line.
"""

from __future__ import annotations

from typing import Any

from harli.ipc.inference import ErrorCode

# The daemon's ``Error.code`` -> (HTTP status, OpenAI error type).
_BY_CODE: dict[str, tuple[int, str]] = {
    ErrorCode.INVALID: (400, "BadRequestError"),
    ErrorCode.REJECTED: (400, "BadRequestError"),
    ErrorCode.MALFORMED: (400, "BadRequestError"),
    ErrorCode.TOO_LARGE: (413, "BadRequestError"),
    ErrorCode.UNKNOWN_MODEL: (404, "NotFoundError"),
    ErrorCode.NOT_FOUND: (404, "NotFoundError"),
    ErrorCode.UNKNOWN_REQUEST: (404, "NotFoundError"),
    ErrorCode.CONFLICT: (409, "ConflictError"),
    ErrorCode.DUPLICATE_REQUEST: (409, "ConflictError"),
    ErrorCode.UNAVAILABLE: (503, "ServiceUnavailableError"),
    ErrorCode.DECODE_DIED: (503, "ServiceUnavailableError"),
    ErrorCode.SHUTTING_DOWN: (503, "ServiceUnavailableError"),
    ErrorCode.TIMEOUT: (504, "TimeoutError"),
}
_TYPE_BY_STATUS = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionError",
                   404: "NotFoundError", 405: "BadRequestError", 409: "ConflictError",
                   413: "BadRequestError", 422: "BadRequestError", 429: "RateLimitError",
                   503: "ServiceUnavailableError", 504: "TimeoutError"}


class ApiError(Exception):
    """A request that fails with this status and message (``param``: the field at fault)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | int | None = None, err_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.err_type = err_type or _TYPE_BY_STATUS.get(status, "InternalServerError")

    @classmethod
    def from_daemon(cls, code: str, message: str) -> ApiError:
        """The daemon's typed error (``RequestError``) as the client should see it."""
        status, err_type = _BY_CODE.get(code, (500, "InternalServerError"))
        return cls(status, message, code=code, err_type=err_type)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.err_type, self.param, self.code)


def error_body(message: str, err_type: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def bad_field(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")
