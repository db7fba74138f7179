"""The payment provider's incoming webhook: ``POST /api/v1/payments/webhook``.

Signed per Standard Webhooks (https://www.standardwebhooks.com): headers
``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``
(``v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<raw body>")>``, several
space-separated during a secret rotation), the secret in
``PAYMENTS_WEBHOOK_SECRET`` as ``whsec_<base64>``. No API key: the signature is
the authentication. Body::

    {"type": "payment.succeeded",
     "data": {"invoice_number": "INV-2026-000001", "amount": "100.00", "currency": "USD",
              "reference": "pi_123"}}

``payment.failed`` (``data``: ``invoice_number``, optional ``reason``) leaves
the invoice issued and publishes ``invoice.payment_failed`` once per event id
(alerts then counts a failed auto top-up). Other event types are acknowledged
and ignored. The ``webhook-id`` is the provider's event id: a redelivered event
records nothing new and answers as the first delivery did, so the provider may
retry freely.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from decimal import Decimal

from django.conf import settings
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.api.base import errors
from billing.api.idempotency import run_idempotent
from billing.errors import BillingError, InvalidRequest, NotFound
from billing.models import Invoice, Payment
from billing.numbers import parse_decimal
from billing.services.invoices import invoice_payment_failed, payment_record

PAID_EVENT = "payment.succeeded"
FAILED_EVENT = "payment.failed"


class InvalidSignature(BillingError):
    code = "invalid_signature"
    http_status = 401


class WebhookNotConfigured(BillingError):
    code = "not_configured"
    http_status = 503


def _secret_bytes(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookNotConfigured("PAYMENTS_WEBHOOK_SECRET is not a whsec_<base64> secret.") from None


def verify_signature(*, secret: str, msg_id: str, timestamp: str, signature_header: str, body: bytes,
                     now: float | None = None) -> None:
    """Raise InvalidSignature unless one ``v1`` signature matches and the timestamp is recent."""
    if not (msg_id and timestamp and signature_header):
        raise InvalidSignature("Missing webhook-id, webhook-timestamp or webhook-signature header.")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise InvalidSignature("webhook-timestamp is not a Unix timestamp.") from None
    now = time.time() if now is None else now
    if abs(now - sent_at) > settings.PAYMENTS_WEBHOOK_TOLERANCE_SECONDS:
        raise InvalidSignature("webhook-timestamp is too far from now.", details={"timestamp": timestamp})
    expected = base64.b64encode(hmac.new(
        _secret_bytes(secret), msg_id.encode() + b"." + timestamp.encode() + b"." + body, hashlib.sha256,
    ).digest()).decode()
    for candidate in signature_header.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return
    raise InvalidSignature("No webhook-signature matches the payload.")


def _payment_fields(payload) -> tuple[str, Decimal, str, str]:
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        raise InvalidRequest("The event has no data object.", details={"data": "required"})
    number, currency, reference = data.get("invoice_number"), data.get("currency"), data.get("reference", "")
    if not isinstance(number, str) or not number:
        raise InvalidRequest("data.invoice_number is required.", details={"data.invoice_number": "required"})
    if not isinstance(currency, str) or len(currency) != 3:
        raise InvalidRequest("data.currency is a three-letter code.", details={"data.currency": "required"})
    if not isinstance(reference, str):
        raise InvalidRequest("data.reference is a string.", details={"data.reference": "must be a string"})
    try:
        amount = parse_decimal(data.get("amount"), places=4, maximum=Decimal("9999999999999999"), allow_zero=False)
    except ValueError as error:
        raise InvalidRequest(f"data.amount {error}.", details={"data.amount": str(error)}) from None
    return number, amount, currency.upper(), reference[:255]


PaymentWebhookAnswer = inline_serializer("PaymentWebhookAnswer", {
    "status": serializers.ChoiceField(choices=["recorded", "duplicate", "ignored", "payment_failed"]),
    "payment": serializers.IntegerField(required=False),
    "invoice": serializers.CharField(required=False),
    "invoice_status": serializers.CharField(required=False),
})


class PaymentWebhookApi(APIView):
    """Record a payment the provider reports; a fully paid invoice releases the credits waiting for it."""

    authentication_classes: list = []
    permission_classes: list = []
    throttle_classes: list = []

    @extend_schema(
        operation_id="payments_webhook", request=None,
        responses={200: PaymentWebhookAnswer, **errors(400, 404, 409, 503)},
        parameters=[OpenApiParameter(name, str, OpenApiParameter.HEADER, required=True)
                    for name in ("webhook-id", "webhook-timestamp", "webhook-signature")],
    )
    def post(self, request):
        secret = settings.PAYMENTS_WEBHOOK_SECRET
        if not secret:
            raise WebhookNotConfigured("The payment webhook is not configured (PAYMENTS_WEBHOOK_SECRET).")
        body = request.body
        msg_id = request.headers.get("webhook-id", "")
        verify_signature(secret=secret, msg_id=msg_id, timestamp=request.headers.get("webhook-timestamp", ""),
                         signature_header=request.headers.get("webhook-signature", ""), body=body)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("The body is not JSON.") from None
        if isinstance(payload, dict) and payload.get("type") == FAILED_EVENT:
            return self._failed(msg_id, payload)
        if not isinstance(payload, dict) or payload.get("type") != PAID_EVENT:
            return Response({"status": "ignored"})
        event_id = f"webhook:{msg_id}"[:255]
        existing = Payment.objects.select_related("invoice").filter(provider_event_id=event_id).first()
        if existing is not None:
            return Response(self._answer("duplicate", existing))
        number, amount, currency, reference = _payment_fields(payload)
        invoice = Invoice.objects.filter(number=number).only("pk").first()
        if invoice is None:
            raise NotFound(f"No invoice {number!r}."[:300], details={"data.invoice_number": "not found"})
        payment = payment_record(invoice_id=invoice.pk, amount=amount, currency=currency,
                                 method=Payment.Method.WEBHOOK, reference=reference, provider_event_id=event_id,
                                 actor_label="payment webhook")
        payment = Payment.objects.select_related("invoice").get(pk=payment.pk)
        return Response(self._answer("recorded", payment))

    @staticmethod
    def _failed(msg_id: str, payload: dict) -> Response:
        data = payload.get("data")
        number = data.get("invoice_number") if isinstance(data, dict) else None
        reason = data.get("reason", "") if isinstance(data, dict) else ""
        if not isinstance(number, str) or not number:
            raise InvalidRequest("data.invoice_number is required.", details={"data.invoice_number": "required"})
        if not isinstance(reason, str):
            raise InvalidRequest("data.reason is a string.", details={"data.reason": "must be a string"})
        invoice = Invoice.objects.filter(number=number).only("pk").first()
        if invoice is None:
            raise NotFound(f"No invoice {number!r}."[:300], details={"data.invoice_number": "not found"})

        def perform():
            failed = invoice_payment_failed(invoice_id=invoice.pk, reason=reason, actor_label="payment webhook")
            return 200, {"status": "payment_failed", "invoice": failed.number, "invoice_status": failed.status}

        return run_idempotent(operation="payments.webhook.failed", key=msg_id[:255], payload=payload,
                              perform=perform)

    @staticmethod
    def _answer(status: str, payment: Payment) -> dict:
        return {"status": status, "payment": payment.pk, "invoice": payment.invoice.number,
                "invoice_status": payment.invoice.status}
