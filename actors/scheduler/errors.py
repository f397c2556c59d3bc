"""Errors the scheduler raises for requests it cannot take (mapped to HTTP by the API)."""

from __future__ import annotations

# OpenAI's error type by status (the API's own table: api.errors; actors do not import it)
_TYPES = {500: "InternalServerError", 503: "ServiceUnavailableError"}


class AdmissionError(Exception):
    """A request refused at admission, in OpenAI's error shape.

    400: it can never fit (prompt + max_tokens beyond max_model_len, prompt larger than the
    whole KV cache, empty prompt, duplicate request id) or its grammar did not compile.
    503: the waiting queue is full; `retry_after` (seconds) goes to the `Retry-After`
    header. 500: the engine could not build what the request needs (a grammar compiler).
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "BadRequestError")

    def __repr__(self) -> str:
        return f"AdmissionError({self.status}, {self.message!r}, param={self.param!r})"
