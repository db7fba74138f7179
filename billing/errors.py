"""The one domain error type of billing, translated by the API and the admin."""

from __future__ import annotations


class BillingError(Exception):
    """A refused operation. ``code`` and ``http_status`` follow API.md's error envelope."""

    code = "invalid_request"
    http_status = 400

    def __init__(self, message: str, *, details: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code:
            self.code = code

    def as_envelope(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class InvalidRequest(BillingError):
    code = "invalid_request"
    http_status = 400


class NotFound(BillingError):
    code = "not_found"
    http_status = 404


class PermissionDenied(BillingError):
    code = "forbidden"
    http_status = 403


class InsufficientCredits(BillingError):
    code = "insufficient_credits"
    http_status = 402


class Conflict(BillingError):
    code = "conflict"
    http_status = 409


class IdempotencyConflict(BillingError):
    code = "idempotency_conflict"
    http_status = 409
