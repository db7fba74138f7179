"""Keep the error envelope for /api/ responses that never reach a DRF view:
unknown URLs (Django's 404), request bodies Django refuses (400/413), and any
exception raised outside a view (logged, answered as a 500 envelope). And the
session, CSRF, auth and messages middleware, skipped for /api/ (``NotForApi``)."""

from __future__ import annotations

import logging

from django.contrib.auth.middleware import AuthenticationMiddleware as _AuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware as _MessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware as _SessionMiddleware
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware as _CsrfViewMiddleware

from billing.api.errors import json_error

logger = logging.getLogger("billing.api")

API_PREFIX = "/api/"
_MESSAGES = {
    400: "Bad request.",
    403: "Forbidden.",
    404: "Not found: no such API endpoint.",
    405: "Method not allowed.",
    413: "Request body too large.",
}


class ApiErrorEnvelopeMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if (
            response.status_code >= 400
            and request.path.startswith(API_PREFIX)
            and not response.get("Content-Type", "").startswith("application/json")
        ):
            status = response.status_code
            return json_error(status, _MESSAGES.get(status, "An unexpected error occurred; it has been logged."
                                                    if status >= 500 else "Request refused."))
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not request.path.startswith(API_PREFIX):
            return None
        logger.exception("Unhandled error on %s %s", request.method, request.path)
        return json_error(500, "An unexpected error occurred; it has been logged.")



class NotForApi:
    """Mixed into a middleware class: run it for every path but /api/. API requests
    carry a bearer key, never a session, a CSRF token, a logged-in user or flash
    messages, so session, CSRF, auth and messages middleware are only cost there.
    The classes stay subclasses of Django's (the admin's checks look for those)."""

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info.startswith(API_PREFIX):
            return self.get_response(request)
        return super().__call__(request)


class SessionMiddleware(NotForApi, _SessionMiddleware):
    pass


class AuthenticationMiddleware(NotForApi, _AuthenticationMiddleware):
    pass


class MessageMiddleware(NotForApi, _MessageMiddleware):
    pass


class CsrfViewMiddleware(NotForApi, _CsrfViewMiddleware):
    def process_view(self, request, callback, callback_args, callback_kwargs):
        if request.path_info.startswith(API_PREFIX):
            return None  # every API view is csrf_exempt anyway
        return super().process_view(request, callback, callback_args, callback_kwargs)
