"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.responses import JSONResponse

from ladle.errors import InvalidRequestError, LadleError

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "requests",
    500: "server_error",
    503: "service_unavailable",
}


# Anthropic's error types by status (its Messages API routes answer in its format)
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
ANTHROPIC_PREFIX = "/v1/messages"  # the routes whose errors take Anthropic's format
KSERVE_PREFIX = "/v2"  # the KServe v2 routes: errors as {"error": "..."}


class BodyTooLarge(Exception):
    """The request body grew past --max-request-bytes while being read."""


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict:
        """The error in Anthropic's format (its type by status; the message names the field)."""
        kind = _ANTHROPIC_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, path: str = "") -> JSONResponse:
        """The error in the format of the API that `path` belongs to (OpenAI's, Anthropic's, KServe's)."""
        if path == KSERVE_PREFIX or path.startswith(KSERVE_PREFIX + "/"):
            body = {"error": self.message}
        else:
            body = self.anthropic_body() if path.startswith(ANTHROPIC_PREFIX) else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def from_validation_error(e: ValidationError) -> APIError:
    """The first problem pydantic found, named by its field path (`messages.0.role`)."""
    err = e.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith("function-")]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        msg = "field required"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def from_ladle_error(e: LadleError) -> APIError:
    param = e.param if isinstance(e, InvalidRequestError) else None
    code = "context_length_exceeded" if "context length" in str(e) else "invalid_value"
    return APIError(400, str(e), param=param, code=code)


async def read_json_object(request) -> dict:
    """The request's body as a JSON object, or the 400 (invalid_json) that says what is wrong."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data
