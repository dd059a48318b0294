"""The contract's error body for every error the gateway answers, FastAPI's own included.

Every error is `{"error": {"type", "code", "message", "param"}}` with a fitting status (the contract's
"Errors" section). Routes raise `ApiError`; FastAPI's request validation (422), routing (404, 405)
and Starlette's HTTP errors are rewritten into the same shape; Redis being unreachable is a 503 with
Retry-After; anything else is a 500, which is a bug (it is logged with its traceback, the body never
carries one).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ddserve.service")

# error type per status (OpenAI-style `type`)
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    406: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}

REDIS_RETRY_AFTER_S = 5

# The code of each HTTP error FastAPI or Starlette raise themselves (routing; a body FastAPI could
# not read is a 400); any other status of theirs answers FRAMEWORK_DEFAULT_CODE. Every code the
# gateway answers is in docs/errors.md (tests/test_error_codes.py compares the two).
FRAMEWORK_CODES = {
    400: "invalid_body",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}
FRAMEWORK_DEFAULT_CODE = "http_error"
# pydantic's error type → the code of a body's 422; any other type is VALIDATION_DEFAULT_CODE
VALIDATION_CODES = {"missing": "missing_field", "extra_forbidden": "unknown_field"}
VALIDATION_DEFAULT_CODE = "invalid_value"


class ErrorDetail(BaseModel):
    type: str = Field(description="error class: invalid_request_error, authentication_error, …")
    code: str = Field(description="machine-readable reason, e.g. unknown_model, queue_full")
    message: str = Field(description="what went wrong and how to fix it")
    param: str | None = Field(None, description="the request field at fault, if any")


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class ApiError(Exception):
    """An error answer: status, code, message, the field at fault, extra headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.type = type_ or _TYPES.get(status, "invalid_request_error")


def error_response(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    type_: str | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "type": type_ or _TYPES.get(status, "invalid_request_error"),
            "code": code,
            "message": message,
            "param": param,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """FastAPI's error location → the contract's `param`: ("body", "output", "return") →
    "output.return"; list indices as [i]: ("body", "images", 0) → "images[0]"."""
    parts = list(loc)
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _validation_message(errors: list[dict[str, Any]]) -> str:
    pieces = []
    for err in errors[:5]:
        where = _param(err.get("loc", ())) or "body"
        pieces.append(f"{where}: {err.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(pieces) + more


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers, exc.type)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    kind, loc = first.get("type"), tuple(first.get("loc", ()))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        message = "the request body is not valid JSON" + (f" ({detail})" if detail else "")
        return error_response(400, "invalid_json", message)
    if loc == ("body",) and kind in {"model_attributes_type", "dict_type"}:
        return error_response(
            400,
            "invalid_body",
            "the body must be a JSON object (send Content-Type: application/json)",
        )
    code = VALIDATION_CODES.get(str(kind), VALIDATION_DEFAULT_CODE)
    return error_response(422, code, _validation_message(errors), _param(loc))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = FRAMEWORK_CODES.get(status, FRAMEWORK_DEFAULT_CODE)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if status == 404 and message == "Not Found":
        message = "no such route; see /docs for the API"
    return error_response(status, code, message, None, exc.headers)


async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable: %s", type(exc).__name__)
    return error_response(
        503,
        "redis_unavailable",
        "the job queue (Redis) is unreachable; retry shortly",
        headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
    )


async def _bug(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error (a bug): %s", type(exc).__name__, exc_info=exc)
    return error_response(500, "internal_error", "internal error; this is a bug, please report it")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(Exception, _bug)


# OpenAPI: the error answers every job-creating route may give.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "bad input (malformed JSON, bad base64 or PNG, wrong task)",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "body or image too large",
        422: "invalid field (named in `param`)",
        429: "queue full or rate limit (see Retry-After)",
        503: "Redis or workers unavailable (see Retry-After)",
    }.items()
}
