"""OpenAI error objects: the status, and `{"error": {message, type, param, code}}`."""

from __future__ import annotations

from typing import Any

from symphony.lipctl.wire import SymphonyError

# what a server error means to a client: its fault (400), try later (429, 503)
STATUS_OF_ERRNO = {
    "EINVAL": 400,
    "E2BIG": 400,
    "EACCES": 403,
    "ENOSPC": 429,
    "EDQUOT": 429,
    "EAGAIN": 429,
    "EBUSY": 503,
    "ECONNREFUSED": 503,  # the Symphony server is gone or restarting
    "ECONNRESET": 503,
    "EPIPE": 503,
}
TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """A request that ends with an error object and `status`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = TYPE_OF_STATUS.get(self.status, "server_error")
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}


def from_symphony(exc: SymphonyError) -> ApiError:
    """The error object of a failed syscall."""
    status = STATUS_OF_ERRNO.get(exc.errno, 500)
    code = "rate_limit_exceeded" if status == 429 else exc.errno.lower()
    return ApiError(status, exc.message, code=code)
