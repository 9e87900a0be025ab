"""Refusals in the shape OpenAI's clients read, for every HTTP API the gateway serves.

An :class:`ApiError` is an HTTP status plus OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``. ``code`` is the swarm's stable
:class:`ErrorCode` value, except where OpenAI's clients know a code of their own
(``invalid_api_key``, ``model_not_found``). The Anthropic and Ollama routes raise the same
errors; each API's own module renders them in its own shape.
"""

from __future__ import annotations

import math
from typing import Any

from nova_swarm.broker.contract.errors import ErrorCode, RequestFailed

#: Retry-After when the hub gives no hint
DEFAULT_RETRY_AFTER_S = 5.0


class ApiError(Exception):
    """A refusal in OpenAI's shape: ``status`` for HTTP, ``body()`` for the JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if self.status in (429, 503):
            wait = self.retry_after_s if self.retry_after_s is not None else DEFAULT_RETRY_AFTER_S
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return headers


_ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}

#: The swarm's error codes as HTTP statuses; any code not here is a 500.
STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_JSON: 400,
    ErrorCode.BAD_ENCODING: 400,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNKNOWN_FIELD: 400,
    ErrorCode.EMPTY_PROMPT: 400,
    ErrorCode.PROMPT_TOO_LARGE: 400,
    ErrorCode.PAYLOAD_TOO_LARGE: 400,
    ErrorCode.MAX_TOKENS_TOO_LARGE: 400,
    ErrorCode.FANOUT_TOO_LARGE: 400,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.NO_ELIGIBLE_NODES: 503,
    ErrorCode.UNSUPPORTED: 503,
    ErrorCode.MODEL_TOO_LARGE: 503,
    ErrorCode.HUB_BUSY: 503,
    ErrorCode.HUB_STOPPING: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.INVALID_OUTPUT: 502,
}


def error_for(code: ErrorCode, message: str, *, retry_after_s: float | None = None) -> ApiError:
    """The HTTP error for an error reply of the hub's."""
    status = STATUS.get(code, 500)
    if code is ErrorCode.UNKNOWN_MODEL:
        return model_not_found(message)
    return ApiError(status, message, code=code.value, retry_after_s=retry_after_s)


def error_from(exc: RequestFailed) -> ApiError:
    return error_for(exc.code, exc.message, retry_after_s=exc.retry_after_s)


def bad_request(message: str, *, param: str | None = None, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> ApiError:
    return ApiError(400, message, code=code.value, param=param)


def model_not_found(message: str) -> ApiError:
    return ApiError(404, message, code="model_not_found", param="model")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")
