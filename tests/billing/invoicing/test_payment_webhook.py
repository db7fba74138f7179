"""POST /api/v1/payments/webhook: signed by the provider (Standard Webhooks,
signed here with the reference ``standardwebhooks`` library), idempotent per
event id, pays the invoice and releases the credits waiting for it."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import yaml
from django.test import Client
from standardwebhooks.webhooks import Webhook

from billing.models import CreditGrant, Invoice, Payment
from billing.selectors import wallet_balance
from billing.services.grants import default_wallet
from billing.services.invoices import pack_purchase_invoice
from billing.services.packs import pack_purchase
from tests.factories import CreditPackFactory, make_customer

pytestmark = pytest.mark.django_db

SECRET = "whsec_" + base64.b64encode(b"provider-shared-secret-for-tests").decode()
URL = "/api/v1/payments/webhook"


@pytest.fixture(autouse=True)
def _secret(settings):
    settings.PAYMENTS_WEBHOOK_SECRET = SECRET


@pytest.fixture
def pack_invoice(db):
    customer = make_customer("hooli", email="ap@hooli.test")
    wallet = default_wallet(customer)
    pack = CreditPackFactory(code="scale", name="Scale pack", credits=Decimal("10000"), price=Decimal("750"))
    purchase = pack_purchase(wallet=wallet, pack=pack, pending_payment=True)
    return pack_purchase_invoice(purchase_id=purchase.pk), purchase.grant, wallet


def _event(number: str, amount: str = "750.00", currency: str = "USD", kind: str = "payment.succeeded") -> str:
    return json.dumps({"type": kind, "data": {"invoice_number": number, "amount": amount, "currency": currency,
                                              "reference": "pi_3Nx"}})


def post(body: str, *, msg_id: str = "msg_1", secret: str = SECRET, sent_at: datetime | None = None,
         signature: str | None = None):
    sent_at = sent_at or datetime.now(UTC)
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": signature or Webhook(secret).sign(msg_id, sent_at, body),
    }
    return Client().post(URL, data=body, content_type="application/json", headers=headers)


def test_a_signed_payment_pays_the_invoice_and_the_credits_arrive(pack_invoice):
    invoice, grant, wallet = pack_invoice
    response = post(_event(invoice.number))
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "recorded", "payment": Payment.objects.get().pk,
                                "invoice": invoice.number, "invoice_status": "paid"}
    invoice.refresh_from_db()
    grant.refresh_from_db()
    assert invoice.status == Invoice.Status.PAID
    assert grant.status == CreditGrant.Status.ACTIVE
    assert wallet_balance(wallet).available == Decimal("10000")
    payment = Payment.objects.get()
    assert (payment.method, payment.reference, payment.amount) == ("webhook", "pi_3Nx", Decimal("750.00"))


def test_a_redelivered_event_records_nothing_new(pack_invoice):
    invoice, _, _ = pack_invoice
    body = _event(invoice.number, amount="300.00")
    first = post(body, msg_id="msg_partial")
    again = post(body, msg_id="msg_partial")
    assert first.status_code == again.status_code == 200
    assert again.json()["status"] == "duplicate" and again.json()["payment"] == first.json()["payment"]
    invoice.refresh_from_db()
    assert invoice.amount_paid == Decimal("300.00") and invoice.status == Invoice.Status.ISSUED


@pytest.mark.parametrize("tamper", ["wrong_secret", "changed_body", "stale", "unsigned"])
def test_unsigned_or_forged_calls_are_refused(tamper, pack_invoice):
    invoice, grant, _ = pack_invoice
    body = _event(invoice.number)
    if tamper == "wrong_secret":
        response = post(body, secret="whsec_" + base64.b64encode(b"someone-else").decode())
    elif tamper == "changed_body":
        signed = Webhook(SECRET).sign("msg_1", datetime.now(UTC), _event(invoice.number, amount="1.00"))
        response = post(body, signature=signed)
    elif tamper == "stale":
        response = post(body, sent_at=datetime.now(UTC) - timedelta(minutes=10))
    else:
        response = Client().post(URL, data=body, content_type="application/json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_signature"
    assert not Payment.objects.exists()
    grant.refresh_from_db()
    assert grant.status == CreditGrant.Status.PENDING_PAYMENT


def test_a_rotated_secret_still_verifies_with_either_signature(pack_invoice):
    invoice, _, _ = pack_invoice
    body, sent_at = _event(invoice.number), datetime.now(UTC)
    old = Webhook("whsec_" + base64.b64encode(b"retired-secret").decode()).sign("msg_rot", sent_at, body)
    current = Webhook(SECRET).sign("msg_rot", sent_at, body)
    assert post(body, msg_id="msg_rot", sent_at=sent_at, signature=f"{old} {current}").status_code == 200


def test_without_a_configured_secret_every_call_is_refused(settings, pack_invoice):
    settings.PAYMENTS_WEBHOOK_SECRET = ""
    invoice, _, _ = pack_invoice
    response = post(_event(invoice.number))
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_configured"
    schema = yaml.safe_load(Client().get("/api/v1/schema/").content)
    assert "503" in schema["paths"]["/api/v1/payments/webhook"]["post"]["responses"]  # documented, as it answers


def test_other_events_are_acknowledged_and_ignored(pack_invoice):
    invoice, _, _ = pack_invoice
    response = post(_event(invoice.number, kind="charge.dispute.created"))
    assert response.status_code == 200 and response.json() == {"status": "ignored"}
    assert not Payment.objects.exists()


@pytest.mark.parametrize(("event", "status", "code"), [
    ({"number": "INV-1999-000001"}, 404, "not_found"),
    ({"amount": "750.01"}, 409, "conflict"),
    ({"currency": "EUR"}, 400, "invalid_request"),
    ({"amount": "-5"}, 400, "invalid_request"),
    ({"amount": "abc"}, 400, "invalid_request"),
])
def test_payments_that_do_not_fit_the_invoice_are_refused(event, status, code, pack_invoice):
    invoice, _, _ = pack_invoice
    body = _event(event.get("number", invoice.number), amount=event.get("amount", "750.00"),
                  currency=event.get("currency", "USD"))
    response = post(body)
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert not Payment.objects.exists()


def _failed(number: str, reason: str = "Card declined") -> str:
    return json.dumps({"type": "payment.failed", "data": {"invoice_number": number, "reason": reason}})


def test_a_failed_payment_fails_the_auto_top_up_waiting_for_it_once(django_capture_on_commit_callbacks):
    from alerts.models import AutoTopUpRun
    from alerts.services.auto_top_up import auto_top_up_execute, auto_top_up_set
    from billing.models import OutboxEvent

    customer = make_customer("initech", email="ap@initech.test")
    wallet = default_wallet(customer)
    pack = CreditPackFactory(code="refill", credits=Decimal("500"), price=Decimal("50"), validity_days=None)
    auto = auto_top_up_set(wallet=wallet, threshold=Decimal("100"), pack=pack, await_payment=True,
                           max_consecutive_failures=1)
    run = auto_top_up_execute(run_id=AutoTopUpRun.objects.get(auto_top_up=auto).pk)  # an empty wallet breaches
    assert run.status == AutoTopUpRun.Status.AWAITING_PAYMENT
    invoice = pack_purchase_invoice(purchase_id=run.purchase_id)

    with django_capture_on_commit_callbacks(execute=True):
        response = post(_failed(invoice.number), msg_id="msg_failed")
    assert response.status_code == 200
    assert response.json() == {"status": "payment_failed", "invoice": invoice.number, "invoice_status": "issued"}
    run.refresh_from_db()
    assert (run.status, run.detail) == (AutoTopUpRun.Status.PAYMENT_FAILED, "Card declined")
    assert CreditGrant.objects.get(pk=run.grant_id).status == CreditGrant.Status.VOIDED
    auto.refresh_from_db()
    assert not auto.enabled and "Card declined" in auto.disabled_reason

    with django_capture_on_commit_callbacks(execute=True):
        replay = post(_failed(invoice.number), msg_id="msg_failed")
    assert replay.json() == response.json()
    assert OutboxEvent.objects.filter(topic="invoice.payment_failed").count() == 1
    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.ISSUED and not Payment.objects.exists()


def test_a_failed_payment_for_a_paid_or_unknown_invoice_is_refused(pack_invoice):
    invoice, _, _ = pack_invoice
    assert post(_failed("INV-1999-000001"), msg_id="msg_x").json()["error"]["code"] == "not_found"
    assert post(_event(invoice.number), msg_id="msg_paid").status_code == 200
    response = post(_failed(invoice.number), msg_id="msg_late")
    assert (response.status_code, response.json()["error"]["code"]) == (409, "conflict")
    missing = post(json.dumps({"type": "payment.failed", "data": {}}), msg_id="msg_empty")
    assert (missing.status_code, missing.json()["error"]["details"]) == (400, {"data.invoice_number": "required"})
