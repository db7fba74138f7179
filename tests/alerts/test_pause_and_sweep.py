"""Pause at zero and automatic resume; the beat sweep: expiry-driven drops,
days-left levels, expiring-soon notices once per grant, idempotent reruns."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.utils import timezone

from alerts.models import AlertLevel, AlertState, Notification, Severity, WebhookEndpoint
from alerts.services.sweep import alerts_sweep
from billing.models import Wallet
from billing.services.grants import default_wallet, grants_expire_due
from tests.alerts.conftest import charge, make_rule
from tests.factories import grant, make_customer, make_feature

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def feature():
    return make_feature("api-call", "1")


def test_block_wallet_pauses_at_zero_and_resumes_when_credits_arrive(feature, mailoutbox, webhook_receiver):
    WebhookEndpoint.objects.create(url=webhook_receiver.url, event_types=["wallet.paused", "wallet.depleted"])
    make_rule((0, Severity.CRITICAL))
    customer = make_customer(email="ap@acme.test")
    wallet = default_wallet(customer)
    grant(wallet, 10)

    assert charge(customer, feature, 10).http_status == 201
    wallet.refresh_from_db()
    assert wallet.status == Wallet.Status.PAUSED
    refused = charge(customer, feature, 1)
    assert refused.http_status == 402 and refused.body["error"]["details"]["reason"] == "wallet_paused"
    types = sorted(json.loads(r["body"])["type"] for r in webhook_receiver.requests)
    assert types == ["wallet.depleted", "wallet.paused"]
    assert len([m for m in mailoutbox if "wallet paused" in m.subject]) == 1

    grant(wallet, 50)
    wallet.refresh_from_db()
    assert wallet.status == Wallet.Status.ACTIVE
    assert charge(customer, feature, 5).http_status == 201
    assert len([m for m in mailoutbox if "active again" in m.subject]) == 1


def test_overdraft_wallet_is_never_paused(feature):
    customer = make_customer(policy=Wallet.Policy.OVERDRAFT, credit_limit=Decimal("50"))
    wallet = default_wallet(customer)
    grant(wallet, 10)
    charge(customer, feature, 30)
    wallet.refresh_from_db()
    assert wallet.status == Wallet.Status.ACTIVE


def test_expiry_driven_drop_is_caught_by_the_sweep_once(feature, mailoutbox):
    start = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    with time_machine.travel(start, tick=False) as clock:
        make_rule((50, Severity.WARNING))
        customer = make_customer(email="ap@acme.test")
        wallet = default_wallet(customer)
        grant(wallet, 100, kind="promotional", expires_at=start + timedelta(days=1), price_paid=Decimal(0))
        grant(wallet, 30, expires_at=None)
        alerts_sweep()
        assert [m.subject for m in mailoutbox] == [f"{customer.name}: 100.000000 credits expire on 2026-05-05"]

        clock.shift(timedelta(days=2))  # the promotional grant is no longer usable; no job has run yet
        alerts_sweep()
        alerts_sweep()
        low = [m for m in mailoutbox if "running low" in m.subject]
        assert len(low) == 1 and "30.000000 left" in low[0].subject

        grants_expire_due()  # billing's expiry job writes the entry: grant.expired notice, no second low
        alerts_sweep()
        assert len([m for m in mailoutbox if "running low" in m.subject]) == 1
        expired = [m for m in mailoutbox if "credits expired" in m.subject]
        assert len(expired) == 1 and "100.000000 promotional credits" in expired[0].body


def test_expiring_soon_per_kind_once_per_grant(mailoutbox):
    now = timezone.now()
    make_rule((1, Severity.INFO))
    customer = make_customer(email="ap@acme.test")
    wallet = default_wallet(customer)
    prepaid = grant(wallet, 40, expires_at=now + timedelta(days=10))
    grant(wallet, 20, kind="promotional", expires_at=now + timedelta(days=10), price_paid=Decimal(0))
    grant(wallet, 20, kind="promotional", expires_at=now + timedelta(days=2), price_paid=Decimal(0))

    alerts_sweep(now=now + timedelta(minutes=1))
    alerts_sweep(now=now + timedelta(minutes=5))

    notices = Notification.objects.filter(event_type="grant.expiring_soon", channel="email")
    assert sorted((n.payload["kind"], n.payload["remaining"]) for n in notices) == [
        ("prepaid", "40.000000"), ("promotional", "20.000000")]
    mails = [m for m in mailoutbox if "expire on" in m.subject]
    assert len(mails) == 2
    assert any(f"grant #{prepaid.pk}" in m.body and "in 9 days" in m.body for m in mails)


def test_days_left_level_from_the_seven_day_burn(feature, mailoutbox):
    start = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
    with time_machine.travel(start, tick=False) as clock:
        make_rule((AlertLevel.Kind.DAYS_LEFT, 3, Severity.WARNING))
        customer = make_customer(email="ap@acme.test")
        grant(default_wallet(customer), 1000)
        for _ in range(7):
            charge(customer, feature, 70)  # 490 over a week: 70/day; 510 left ≈ 7.3 days
            clock.shift(timedelta(days=1))
        alerts_sweep()
        assert not [m for m in mailoutbox if "running low" in m.subject]
        charge(customer, feature, 350)  # burn (7 days) = 770/7 = 110/day; 160 left ≈ 1.45 days
        alerts_sweep()
        alerts_sweep()
        low = [m for m in mailoutbox if "running low" in m.subject]
        assert len(low) == 1
        assert "Burn rate: 110.000000 credits per day" in low[0].body
        assert "Projected depletion: 2026-06-09" in low[0].body
        assert AlertState.objects.get().status == AlertState.Status.TRIGGERED


def test_sweep_retries_a_delivery_whose_task_was_lost(webhook_receiver):
    customer = make_customer()
    endpoint = WebhookEndpoint.objects.create(url=webhook_receiver.url, event_types=["wallet.paused"])
    lost = Notification.objects.create(
        event_type="wallet.paused", channel="webhook", customer=customer, recipient=endpoint.url, endpoint=endpoint,
        dedupe_key="lost", message_id="msg_lost", created_at=timezone.now() - timedelta(minutes=10))
    alerts_sweep()
    alerts_sweep()
    lost.refresh_from_db()
    assert lost.status == Notification.Status.SENT and lost.attempts == 1
    assert len(webhook_receiver.requests) == 1
