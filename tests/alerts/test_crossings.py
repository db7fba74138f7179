"""Crossing semantics: one level, several at once, recovery with hysteresis,
the frequency limit on a frozen clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine

from alerts.models import AlertState, Notification, Severity
from billing.services.grants import default_wallet
from tests.alerts.conftest import charge, make_rule
from tests.factories import grant, make_customer, make_feature

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def feature():
    return make_feature("api-call", "1")


def customer_with(credits, **kwargs):
    customer = make_customer(email="billing@acme.test", **kwargs)
    grant(default_wallet(customer), credits)
    return customer


def low_emails(mailoutbox):
    return [m for m in mailoutbox if "running low" in m.subject or "used up" in m.subject]


def test_one_level_crossed_sends_one_notice_with_the_numbers(feature, mailoutbox):
    make_rule((50, Severity.WARNING))
    customer = customer_with(100)
    wallet = default_wallet(customer)
    assert wallet.alert_below == Decimal("50.000001")  # armed just above the threshold

    charge(customer, feature, 40)
    assert low_emails(mailoutbox) == []
    charge(customer, feature, 15)
    charge(customer, feature, 1)

    emails = low_emails(mailoutbox)
    assert len(emails) == 1
    email = emails[0]
    assert email.to == ["billing@acme.test"]
    assert "45.000000 left" in email.subject
    assert "threshold of 50.000000 credits" in email.body
    assert "Burn rate: 7.857143 credits per day" in email.body  # 55 / 7 days
    assert "Projected depletion" in email.body and "5.727273 days" in email.body
    html = email.alternatives[0][0]
    assert "How to top up" in html and "45.000000" in html
    state = AlertState.objects.get(wallet=wallet)
    assert (state.status, state.breach_seq) == (AlertState.Status.TRIGGERED, 1)


def test_several_levels_at_once_send_the_most_severe(feature, mailoutbox):
    make_rule((80, Severity.INFO), (50, Severity.WARNING), (20, Severity.CRITICAL))
    customer = customer_with(100)

    charge(customer, feature, 90)

    emails = low_emails(mailoutbox)
    assert len(emails) == 1
    notification = Notification.objects.get(channel="email", event_type="wallet.balance_low")
    assert notification.severity == Severity.CRITICAL
    assert notification.payload["threshold"] == "20.000000"
    assert AlertState.objects.filter(status=AlertState.Status.TRIGGERED).count() == 3


def test_recovery_needs_the_hysteresis_margin(feature, mailoutbox):
    make_rule((50, Severity.WARNING), hysteresis_percent=Decimal("10"))
    customer = customer_with(100)
    wallet = default_wallet(customer)
    charge(customer, feature, 60)  # 40 left: triggered
    wallet.refresh_from_db()
    assert wallet.alert_at_or_above == Decimal("55.000000")

    grant(wallet, 12)  # 52: above the threshold, inside the margin
    assert not [m for m in mailoutbox if "back above" in m.subject]
    assert AlertState.objects.get().status == AlertState.Status.TRIGGERED

    grant(wallet, 5)  # 57: recovered
    recovered = [m for m in mailoutbox if "back above" in m.subject]
    assert len(recovered) == 1 and "57.000000" in recovered[0].body
    assert AlertState.objects.get().status == AlertState.Status.RECOVERED

    charge(customer, feature, 10)  # 47: a new breach
    state = AlertState.objects.get()
    assert (state.status, state.breach_seq) == (AlertState.Status.TRIGGERED, 2)


def test_frequency_limit_per_rule_and_channel_on_a_frozen_clock(feature, mailoutbox):
    start = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    with time_machine.travel(start, tick=False) as clock:
        make_rule((50, Severity.WARNING), hysteresis_percent=Decimal("0"), hysteresis_credits=Decimal("5"))
        customer = customer_with(100)
        wallet = default_wallet(customer)
        charge(customer, feature, 60)  # 40: first breach → sent
        grant(wallet, 20)  # 60: recovered (sent)
        clock.shift(timedelta(hours=2))
        charge(customer, feature, 15)  # 45: second breach within 24 h → suppressed
        assert len(low_emails(mailoutbox)) == 1
        assert Notification.objects.filter(event_type="wallet.balance_low",
                                           status=Notification.Status.SUPPRESSED).count() == 1

        grant(wallet, 20)  # 65: recovered again (the recovered notice is limited too)
        clock.shift(timedelta(hours=23))  # 25 h after the first notice
        charge(customer, feature, 20)  # 45: third breach → sent again
        assert len(low_emails(mailoutbox)) == 2
        assert [s.breach_seq for s in AlertState.objects.all()] == [3]
