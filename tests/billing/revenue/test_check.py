"""The nightly revenue check: quiet when everything ties, an alert finance
sees (email, outbox event, job-run detail) once a difference appears."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core import mail

from billing.models import JobRun, OutboxEvent, PackPurchase
from billing.services.ledger import Movement, append_entries
from billing.services.locks import lock_wallet
from billing.services.revenue import CHECK_JOB, revenue_check_latest
from billing.tasks import revenue_check
from tests.billing.revenue.conftest import charge

pytestmark = pytest.mark.django_db


def run_check(capture) -> int:
    with capture(execute=True):
        return revenue_check()


def test_a_clean_book_passes_quietly(bought, api_feature, django_capture_on_commit_callbacks):
    wallet, _ = bought
    charge(wallet, api_feature, 10)
    assert run_check(django_capture_on_commit_callbacks) == 0
    run = revenue_check_latest()
    assert run.status == "succeeded" and run.detail["ok"] is True and run.detail["checked_grants"] == 1
    assert run.detail["checked_reports"] == 2
    assert mail.outbox == [] and not OutboxEvent.objects.filter(topic="revenue.mismatch").exists()


def test_a_difference_alerts_finance_once(bought, settings, django_capture_on_commit_callbacks):
    settings.CREDITDESK_FINANCE_ALERT_EMAIL = "money@example.com"
    wallet, purchase = bought
    PackPurchase.objects.filter(pk=purchase.pk).update(total_price=Decimal("90.00"))
    assert run_check(django_capture_on_commit_callbacks) > 0
    [message] = mail.outbox
    assert message.to == ["money@example.com"]
    assert f"purchase #{purchase.pk} totals 90.0000, the grant says 100.0000 paid" in message.body
    event = OutboxEvent.objects.get(topic="revenue.mismatch")
    assert event.payload["count"] >= 1
    run = revenue_check_latest()
    assert run.detail["ok"] is False and run.detail["alerted"] is True
    assert any("purchase" in line for line in run.detail["mismatches"])
    # The same differences the same day: recorded again, not alerted again.
    run_check(django_capture_on_commit_callbacks)
    assert len(mail.outbox) == 1 and OutboxEvent.objects.filter(topic="revenue.mismatch").count() == 1
    assert JobRun.objects.filter(name=CHECK_JOB).count() == 2


def test_credits_leaving_without_a_credit_note_are_caught(bought, django_capture_on_commit_callbacks):
    wallet, purchase = bought
    from django.db import transaction

    with transaction.atomic():
        append_entries(wallet=lock_wallet(wallet.pk), movements=[Movement(
            type="refund", amount=Decimal("-5"), grant=purchase.grant, reference="by hand")])
    assert run_check(django_capture_on_commit_callbacks) > 0
    lines = revenue_check_latest().detail["mismatches"]
    assert any("ledger says 995.000000 credits unused, the grant 1000.000000" in line for line in lines)
    assert any("credit notes carry 0 credits, refund entries 5.000000" in line for line in lines)
    assert any("Refunded credits = credit notes' credits: expected 0" in line for line in lines)
