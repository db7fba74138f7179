"""Hybrid plans: periods in the customer's time zone across month ends, leap
days and DST; included credits per period; period close billing fee + overage
exactly once."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, date, datetime
from decimal import Decimal
from unittest import mock

import pytest
import time_machine

from billing.errors import Conflict
from billing.models import CreditGrant, Invoice, InvoiceLine, Plan, Subscription, Wallet
from billing.selectors import wallet_balance
from billing.services.grants import default_wallet
from billing.services.plans import (
    add_months,
    period_bounds,
    subscription_cancel,
    subscription_period_close,
    subscription_start,
    subscriptions_close_due,
)
from billing.services.usage import ChargeRequest, usage_charge
from tests.conftest import assert_ledger_consistent
from tests.factories import make_customer, make_feature

pytestmark = pytest.mark.django_db
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def local(*args) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


@pytest.mark.parametrize(("anchor", "months", "expected"), [
    (date(2026, 1, 31), 1, date(2026, 2, 28)),
    (date(2028, 1, 31), 1, date(2028, 2, 29)),
    (date(2028, 1, 31), 2, date(2028, 3, 31)),
    (date(2026, 1, 31), 3, date(2026, 4, 30)),
    (date(2026, 12, 15), 1, date(2027, 1, 15)),
    (date(2028, 2, 29), 12, date(2029, 2, 28)),
    (date(2028, 2, 29), 48, date(2032, 2, 29)),
])
def test_add_months_clamps_to_the_month_end_and_keeps_the_anchor(anchor, months, expected):
    assert add_months(anchor, months) == expected


def test_periods_run_local_midnight_to_local_midnight_across_dst():
    start, end = period_bounds(anchor=date(2026, 3, 15), index=0, months=1, tz_name="Europe/Berlin")
    assert start == datetime(2026, 3, 14, 23, tzinfo=UTC)  # CET, UTC+1
    assert end == datetime(2026, 4, 14, 22, tzinfo=UTC)  # CEST, UTC+2 after 29 March
    start, end = period_bounds(anchor=date(2026, 10, 1), index=0, months=1, tz_name="Europe/Berlin")
    assert (end.astimezone(UTC) - start.astimezone(UTC)).total_seconds() == 31 * 24 * 3600 + 3600  # the October night an hour longer


@pytest.fixture
def plan(db):
    return Plan.objects.create(
        code="pro", name="Pro", currency="EUR", base_fee=Decimal("49.00"), included_credits=Decimal("1000"),
        overage_policy=Plan.OveragePolicy.OVERDRAFT, overage_price=Decimal("0.02"), overage_cap=Decimal("500"),
    )


def _charge(wallet: Wallet, feature, quantity: str, event_id: str):
    return usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                      quantity=Decimal(quantity), event_id=event_id))


def test_a_year_from_31_january_in_a_leap_year(plan):
    feature = make_feature("api-call", "1", effective_from=datetime(2027, 1, 1, tzinfo=UTC))
    customer = make_customer("leap", timezone_name="Europe/Berlin", currency="EUR", email="ap@leap.test")
    wallet = default_wallet(customer)
    with time_machine.travel(local(2028, 1, 31, 10), tick=False):
        subscription = subscription_start(customer=customer, plan=plan)
    wallet.refresh_from_db()
    assert (wallet.policy, wallet.credit_limit) == (Wallet.Policy.OVERDRAFT, Decimal("500"))
    assert subscription.current_period_start == local(2028, 1, 31)
    assert subscription.current_period_end == local(2028, 2, 29)
    first = subscription.periods.get(index=0).included_grant
    assert (first.kind, first.original_amount, first.expires_at) == ("included", Decimal("1000"), local(2028, 2, 29))

    with time_machine.travel(local(2028, 2, 20, 12), tick=False):
        assert _charge(wallet, feature, "1200", "evt-feb").status == "charged"
        assert subscriptions_close_due() == 0  # the period is not over yet
    wallet.refresh_from_db()
    assert wallet.overage == Decimal("200")

    with time_machine.travel(local(2028, 2, 29, 0, 30), tick=False):
        assert subscriptions_close_due() == 1
        assert subscriptions_close_due() == 0  # rerun: nothing more
        wallet.refresh_from_db()
        available = wallet_balance(wallet).available

    period = subscription.periods.get(index=0)
    invoice = period.invoice
    assert invoice.number == "INV-2028-000001" and invoice.status == Invoice.Status.ISSUED
    assert [(line.kind, line.description, line.amount) for line in invoice.lines.all()] == [
        (InvoiceLine.Kind.PLAN_FEE, "Pro, 2028-01-31 – 2028-02-28", Decimal("49.00")),
        (InvoiceLine.Kind.OVERAGE, "Overage credits, 2028-01-31 – 2028-02-28", Decimal("4.00")),
    ]
    assert invoice.total == Decimal("53.00") and invoice.currency == "EUR"
    wallet.refresh_from_db()
    assert wallet.overage == 0
    first.refresh_from_db()
    assert first.status in (CreditGrant.Status.DEPLETED, CreditGrant.Status.EXPIRED) and first.remaining == 0
    assert available == Decimal("1000") + Decimal("500")  # next period's credits + overdraft headroom
    subscription.refresh_from_db()
    assert (subscription.current_period_start, subscription.current_period_end) == (
        local(2028, 2, 29), local(2028, 3, 31))

    # Periods keep the 31st: March ends on the 31st, April on the 30th; the
    # unused March credits expire at the close without an invoice line for them.
    with time_machine.travel(local(2028, 5, 1, 8), tick=False):
        assert subscriptions_close_due() == 2  # catches up the periods ending 31 March and 30 April
    assert list(subscription.periods.order_by("index").values_list("starts_at", flat=True)) == [
        local(2028, 1, 31), local(2028, 2, 29), local(2028, 3, 31), local(2028, 4, 30)]
    assert_ledger_consistent(wallet)


def test_closing_twice_bills_once_and_cancel_at_period_end_stops_the_grants(plan):
    customer = make_customer("closer", timezone_name="UTC", currency="EUR")
    with time_machine.travel(datetime(2026, 1, 31, 9, tzinfo=UTC), tick=False):
        subscription = subscription_start(customer=customer, plan=plan)
        with pytest.raises(Conflict):
            subscription_start(customer=customer, plan=plan)
        subscription_cancel(subscription_id=subscription.pk)
    at = datetime(2026, 2, 28, 0, 0, 1, tzinfo=UTC)
    with time_machine.travel(at, tick=False):
        assert subscription_period_close(subscription_id=subscription.pk) is not None
        assert subscription_period_close(subscription_id=subscription.pk) is None
    subscription.refresh_from_db()
    assert subscription.status == Subscription.Status.CANCELED
    assert Invoice.objects.filter(customer=customer).count() == 1
    assert CreditGrant.objects.filter(wallet__customer=customer, kind="included").count() == 1
    wallet = default_wallet(customer)
    assert wallet_balance(wallet).grants == []
    assert (wallet.policy, wallet.credit_limit) == ("block", 0), "the plan's overdraft ends with the subscription"


def test_a_close_killed_midway_leaves_nothing_and_the_rerun_bills_once(plan):
    customer = make_customer("killed", timezone_name="America/New_York", currency="EUR")
    with time_machine.travel(datetime(2026, 3, 1, 15, tzinfo=UTC), tick=False):
        subscription = subscription_start(customer=customer, plan=plan)
    entries_before = default_wallet(customer).entries.count()
    with time_machine.travel(datetime(2026, 4, 1, 12, tzinfo=UTC), tick=False):
        with mock.patch("billing.services.plans.invoice_issue", side_effect=RuntimeError("worker killed")):
            with pytest.raises(RuntimeError):
                subscriptions_close_due()
        subscription.refresh_from_db()
        assert subscription.period_index == 0 and not Invoice.objects.filter(customer=customer).exists()
        assert default_wallet(customer).entries.count() == entries_before
        assert subscriptions_close_due() == 1
    subscription.refresh_from_db()
    assert subscription.period_index == 1
    # New York midnight, 1 April (EDT, UTC-4), although the subscription started in EST.
    assert subscription.current_period_start == datetime(2026, 4, 1, 4, tzinfo=UTC)
    assert Invoice.objects.filter(customer=customer).count() == 1
    assert_ledger_consistent(default_wallet(customer))


def test_trial_credits_and_capped_rollover_that_lives_for_its_periods():
    from billing.services.grants import grants_expire_due

    plan = Plan.objects.create(code="roll", name="Roll", included_credits=Decimal("1000"),
                               rollover_percent=Decimal("25"), rollover_periods=2, trial_credits=Decimal("300"))
    feature = make_feature("api-call", "1", effective_from=datetime(2025, 1, 1, tzinfo=UTC))
    customer = make_customer("roller")
    wallet = default_wallet(customer)

    def at(*args):
        return time_machine.travel(datetime(*args, tzinfo=UTC), tick=False)

    with at(2026, 1, 1, 9):
        subscription_start(customer=customer, plan=plan)
        trial = CreditGrant.objects.get(wallet=wallet, kind="promotional")
        assert (trial.original_amount, trial.expires_at) == (Decimal("300"), datetime(2026, 2, 1, tzinfo=UTC))
        assert wallet_balance(wallet).available == Decimal("1300")
    with at(2026, 2, 1, 0, 5):
        subscriptions_close_due()
        grants_expire_due()
        rolled = CreditGrant.objects.get(wallet=wallet, kind="rollover")
        # 1000 unused, capped at 25 % of 1000; usable through the second period after.
        assert (rolled.original_amount, rolled.expires_at) == (Decimal("250"), datetime(2026, 4, 1, tzinfo=UTC))
        assert wallet_balance(wallet).available == Decimal("1250")
    with at(2026, 2, 20):
        assert _charge(wallet, feature, "1100", "evt-feb").status == "charged"  # included first: it expires first
    with at(2026, 3, 1, 0, 5):
        subscriptions_close_due()
        assert CreditGrant.objects.filter(wallet=wallet, kind="rollover").count() == 1  # nothing left to roll
        rolled.refresh_from_db()
        assert rolled.remaining == Decimal("150")
    with at(2026, 4, 1, 0, 5):
        subscriptions_close_due()
        grants_expire_due()
        rolled.refresh_from_db()
        assert rolled.status == CreditGrant.Status.EXPIRED
        wallet.refresh_from_db()
        assert wallet_balance(wallet).available == Decimal("1000") + Decimal("250")
    movements = list(wallet.entries.filter(type__in=["rollover_out", "rollover_in"]).values_list("type", "amount"))
    assert sorted(movements) == [("rollover_in", Decimal("250"))] * 2 + [("rollover_out", Decimal("-250"))] * 2
    assert_ledger_consistent(wallet)
