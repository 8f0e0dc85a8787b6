"""Every error answered as OpenAI-style JSON: ``{"error": {"message", "type", "param", "code"}}``.

    curl -s localhost:6006/no/such/route     # {"error": {"message": "no route GET /no/such/route", ...}}
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from python3_distillation.errors import BadInput

log = logging.getLogger(__name__)

# The closed set of error types (also the metrics' "type" label).
HTTP_ERROR_TYPES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                    415: "unsupported_media_type", 421: "misdirected_request", 429: "rate_limit_exceeded",
                    502: "backend_error", 503: "not_ready", 504: "timeout"}
ERROR_TYPES = frozenset(HTTP_ERROR_TYPES.values()) | {"invalid_request_error", "model_not_found", "server_error",
                                                      "http_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.headers = headers or {}
        self.extra = extra or {}  # more top-level fields of the body (e.g. /ready's "status" and "reason")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status},
                **self.extra}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(422, message, "invalid_request_error", param)


def not_ready(body: dict[str, Any]) -> ApiError:
    """503 for a probe's ``{"status", "reason"}``, which the error body carries beside the error object."""
    return ApiError(503, body["reason"], "not_ready", headers={"Retry-After": "5"}, extra=body)


def error_response(err: ApiError) -> Response:
    g.error_type = err.type if err.type in ERROR_TYPES else "http_error"
    response = jsonify(err.body())
    response.status_code = err.status
    response.headers.update(err.headers)
    return response


def _http_error(e: HTTPException) -> Response:
    code, message, headers = e.code or 500, e.description or e.name, {}
    if code == 404:
        message = f"no route {request.method} {request.path[:200]}"
    elif code == 413:
        message = f"request body over the {current_app.config['MAX_CONTENT_LENGTH']} byte limit"
    elif isinstance(e, MethodNotAllowed) and e.valid_methods:
        headers["Allow"] = ", ".join(sorted(e.valid_methods))
        message = f"{request.method[:20]} is not allowed on {request.path[:200]}; use {headers['Allow']}"
    return error_response(ApiError(code, message, HTTP_ERROR_TYPES.get(code, "http_error"), headers=headers))


def _bad_input(e: BadInput) -> Response:  # a body breaking its schema, sampling values, a prompt too long...
    return error_response(ApiError(e.status, e.message, "invalid_json" if e.status == 400 else "invalid_request_error",
                                   e.param))


def _unexpected_error(e: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(ApiError(500, f"internal error: {type(e).__name__}", "server_error"))


def install(app: Flask) -> None:
    app.register_error_handler(ApiError, error_response)
    app.register_error_handler(BadInput, _bad_input)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
