"""Our exception classes and their mapping to OpenAI's error JSON.

Every failure leaves the server as `{"error": {"message", "type", "param", "code"}}` with a
status chosen by the exception's class (never by matching message text). Validation errors
(FastAPI's 422) become 400 with the offending field in `param`; unknown routes and methods
become 404/405 in the same envelope; anything unexpected is a 500 whose body says nothing
about the internals (the traceback goes to the server log only).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("nanochat.serve")


class APIError(Exception):
    """Base class: a message for the client, the HTTP status and OpenAI's error type/code."""
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Overloaded(APIError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class ServiceUnavailable(APIError):
    status = 503
    type = "server_error"
    code = "unavailable"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(err, AuthenticationFailed) else None
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=headers)


# fields accepting several types: pydantic reports one error per type, we say what is accepted
UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "literal"}


def _is_union_tag(part: str) -> bool:
    return part in _TYPE_TAGS or any(c in part for c in "[-") or part != part.lower()


def _validation_param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; pydantic's union branch names are dropped."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _is_union_tag(str(p)):
            continue  # a union member tag such as 'list[int]', not a field
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"request body is not valid JSON: {first.get('msg')} (at position {first['loc'][-1]})", code="invalid_json")
    param = _validation_param(tuple(first.get("loc", ())))
    expected = UNION_FIELDS.get((param or "").split(".")[-1]) if len(errors) > 1 else None
    # a union field fails once per accepted type: count those as one problem
    others = [e for e in errors[1:] if not (expected and _validation_param(tuple(e["loc"])).startswith(param))
              and _validation_param(tuple(e["loc"])) != param]
    message = f"{param or 'request body'}: " + (f"expected {expected}" if expected else str(first.get("msg")))
    if "input" in first and first.get("type") != "missing":
        message += f" (got {str(first['input'])[:100]!r})"
    if others:
        message += f"; and {len(others)} more problem(s), the next at '{_validation_param(tuple(others[0]['loc']))}'"
    return InvalidRequest(message, param=param, code="invalid_value" if first.get("type") != "missing" else "missing_field")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, POST /v1/chat/completions"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}"))
        err = APIError(str(exc.detail))
        err.status = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError("internal server error; see the server log"))
