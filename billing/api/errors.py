"""One error envelope for everything under /api/ (API.md, "Errors"):
``{"error": {"code": ..., "message": ..., "details": {...}}}``.

``exception_handler`` is DRF's EXCEPTION_HANDLER: it translates DRF exceptions,
Django's Http404/PermissionDenied and ``BillingError`` subclasses, and turns
anything unexpected into a logged 500 envelope instead of an HTML page.
"""

from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, JsonResponse
from rest_framework import exceptions
from rest_framework.response import Response

from billing.errors import BillingError

logger = logging.getLogger("billing.api")

# DRF exception class -> (code, status override or None)
_DRF_CODES: list[tuple[type[exceptions.APIException], str]] = [
    (exceptions.NotAuthenticated, "unauthorized"),
    (exceptions.AuthenticationFailed, "unauthorized"),
    (exceptions.PermissionDenied, "forbidden"),
    (exceptions.NotFound, "not_found"),
    (exceptions.MethodNotAllowed, "method_not_allowed"),
    (exceptions.NotAcceptable, "not_acceptable"),
    (exceptions.UnsupportedMediaType, "invalid_request"),
    (exceptions.Throttled, "rate_limited"),
    (exceptions.ParseError, "invalid_request"),
    (exceptions.ValidationError, "invalid_request"),
]

STATUS_CODES = {
    400: "invalid_request", 401: "unauthorized", 402: "insufficient_credits", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "invalid_request",
    415: "invalid_request", 429: "rate_limited",
}


def envelope(code: str, message: str, details: dict | None = None) -> dict:
    return {"error": {"code": code, "message": _printable(message), "details": _printable(details or {})}}


def _printable(value):
    """Error messages may echo client input: keep them encodable as UTF-8 JSON."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_printable(str(k)): _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


def json_error(status: int, message: str, details: dict | None = None) -> JsonResponse:
    """A plain Django response in the envelope, for code outside DRF views (middleware)."""
    code = STATUS_CODES.get(status, "internal_error" if status >= 500 else "invalid_request")
    return JsonResponse(envelope(code, message, details), status=status)


def flatten_details(detail) -> dict:
    """DRF's ``{"field": ["msg", ...]}`` → ``{"field": "msg"}`` (nested fields joined with dots)."""
    if isinstance(detail, dict):
        flat: dict[str, str] = {}
        for field, value in detail.items():
            name = "body" if field == "non_field_errors" else str(field)
            if isinstance(value, dict):
                for sub, message in flatten_details(value).items():
                    flat[f"{name}.{sub}"] = message
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for index, item in enumerate(value):
                    for sub, message in flatten_details(item).items():
                        flat[f"{name}.{index}.{sub}"] = message
            elif isinstance(value, list):
                flat[name] = " ".join(str(v) for v in value)
            else:
                flat[name] = str(value)
        return flat
    if isinstance(detail, list):
        return {"body": " ".join(str(v) for v in detail)}
    return {"body": str(detail)}


def _validation_message(details: dict) -> str:
    fields = ", ".join(sorted(details))
    return f"Invalid request: check {fields}." if fields else "Invalid request."


def exception_handler(exc, context) -> Response:
    if isinstance(exc, BillingError):
        return Response(envelope(exc.code, exc.message, exc.details), status=exc.http_status)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if isinstance(exc, exceptions.APIException):
        code = next((c for cls, c in _DRF_CODES if isinstance(exc, cls)), None)
        code = code or STATUS_CODES.get(exc.status_code, "invalid_request")
        headers = {}
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        if getattr(exc, "wait", None):
            headers["Retry-After"] = str(int(exc.wait))
        if isinstance(exc, exceptions.ValidationError):
            details = flatten_details(exc.detail)
            message = _validation_message(details)
        else:
            details = {}
            message = str(exc.detail)
        return Response(envelope(code, message, details), status=exc.status_code, headers=headers)
    view = context.get("view")
    logger.exception("Unhandled error in %s", type(view).__name__ if view else "API view")
    return Response(envelope("internal_error", "An unexpected error occurred; it has been logged."), status=500)
