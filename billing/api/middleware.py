"""Keep the error envelope for /api/ responses that never reach a DRF view:
unknown URLs (Django's 404), request bodies Django refuses (400/413), and any
exception raised outside a view (logged, answered as a 500 envelope)."""

from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse

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
