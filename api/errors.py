"""Errors a request can end in, and their OpenAI-shaped body.

The body is `{"error": {"message", "type", "param", "code"}}`, with vLLM's `type` names
(the class names of the `openai` client: BadRequestError, NotFoundError, ...) and `code`
the HTTP status unless a more specific string code is known (e.g. "invalid_api_key").
"""

from __future__ import annotations

from http import HTTPStatus

_TYPE_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_type_for(status: int) -> str:
    """vLLM-style error type name for an HTTP status."""
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "BadRequestError" if status < 500 else "InternalServerError"


class ApiError(Exception):
    """A request that ends in an HTTP error with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type_for(status)
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        """The JSON body: `{"error": {"message", "type", "param", "code"}}`."""
        return error_body(self.message, self.status, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        """Extra response headers: Retry-After for a 503/429 that knows when to come back."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.message!r}, param={self.param!r})"


class EngineRequestError(ApiError):
    """The engine refused a request before its first delta (raised by `EngineClient.generate`).

    Mirrors `actors.protocol.RequestError`: status, message, type, param, code, retry_after.
    """


def bad_request(message: str, param: str | None = None, code: str | int | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def error_body(
    message: str,
    status: int,
    type: str | None = None,
    param: str | None = None,
    code: str | int | None = None,
) -> dict:
    """OpenAI's error body; `code` defaults to the HTTP status, as in vLLM."""
    return {
        "error": {
            "message": message,
            "type": type or error_type_for(status),
            "param": param,
            "code": status if code is None else code,
        }
    }


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
