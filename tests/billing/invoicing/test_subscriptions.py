"""Subscription lifecycle: mid-period plan changes with exact proration and
included credits, overage policy switches, cancelling now, trials, past_due and
back, and a whole year of period closes on a frozen clock."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from unittest import mock

import pytest
import time_machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.errors import Conflict, InvalidRequest, NotFound
from billing.models import (
    CreditGrant,
    Invoice,
    InvoiceLine,
    LedgerEntry,
    OutboxEvent,
    Plan,
    Subscription,
    SubscriptionChange,
    Wallet,
)
from billing.numbers import round_credits
from billing.selectors import wallet_balance
from billing.services.grants import default_wallet
from billing.services.invoices import payment_record
from billing.services.plans import (
    billable_fraction,
    subscription_cancel,
    subscription_change_plan,
    subscription_change_preview,
    subscription_period_close,
    subscription_refresh_status,
    subscription_start,
    subscriptions_close_due,
    subscriptions_refresh_status,
)
from billing.services.usage import ChargeRequest, usage_charge
from tests.conftest import assert_ledger_consistent
from tests.factories import make_customer, make_feature

pytestmark = pytest.mark.django_db
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def at(moment: datetime):
    return time_machine.travel(moment, tick=False)


@pytest.fixture
def plans(db):
    basic = Plan.objects.create(code="basic", name="Basic", base_fee=Decimal("30.00"),
                                included_credits=Decimal("1000"))
    pro = Plan.objects.create(
        code="pro", name="Pro", base_fee=Decimal("90.00"), included_credits=Decimal("3000"),
        overage_policy=Plan.OveragePolicy.OVERDRAFT, overage_price=Decimal("0.05"), overage_cap=Decimal("1000"),
    )
    return basic, pro


@pytest.fixture
def feature(db):
    return make_feature("api-call", "1", effective_from=utc(2025, 1, 1))


def charge(wallet: Wallet, feature, quantity: str, event_id: str):
    return usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                      quantity=Decimal(quantity), event_id=event_id))


def subscribed(name: str, plan: Plan) -> tuple[Wallet, Subscription]:
    """A new UTC customer ``name`` subscribed to ``plan`` from 2026-04-01 00:00,
    and its default wallet."""
    customer = make_customer(name, timezone_name="UTC")
    wallet = default_wallet(customer)
    with at(utc(2026, 4, 1)):
        return wallet, subscription_start(customer=customer, plan=plan)


def lines(invoice: Invoice) -> list[tuple[str, str, Decimal]]:
    return [(line.kind, line.description, line.amount) for line in invoice.lines.all()]


def test_upgrade_halfway_bills_the_proration_and_grants_half_the_extra_credits(plans, feature):
    basic, pro = plans
    wallet, subscription = subscribed("upgrader", basic)
    with at(utc(2026, 4, 10)):
        charge(wallet, feature, "400", "e1")
    with at(utc(2026, 4, 16)):  # 15 of April's 30 days left: exactly half
        preview = subscription_change_preview(subscription_id=subscription.pk, plan=pro)
        assert (preview.remaining_fraction, preview.unused_credit, preview.remaining_charge, preview.credits_delta) \
            == (Decimal("0.5"), Decimal("15.00"), Decimal("45.00"), Decimal("1000"))
        assert (preview.net_fee, preview.included_remaining, preview.included_after) == (
            Decimal("30.00"), Decimal("600"), Decimal("1600"))
        change = subscription_change_plan(subscription_id=subscription.pk, plan=pro)
        wallet.refresh_from_db()
        assert wallet_balance(wallet).available == Decimal("1600") + Decimal("1000")  # + the new overdraft
    extra = change.included_grant
    assert (extra.kind, extra.original_amount, extra.expires_at) == ("included", Decimal("1000"), utc(2026, 5, 1))
    assert LedgerEntry.objects.filter(grant=extra, type="grant", amount=Decimal("1000")).exists()
    wallet.refresh_from_db()
    assert (wallet.policy, wallet.credit_limit) == (Wallet.Policy.OVERDRAFT, Decimal("1000"))

    with at(utc(2026, 5, 1, 0, 5)):
        assert subscriptions_close_due() == 1
    invoice = subscription.periods.get(index=0).invoice
    assert lines(invoice) == [
        (InvoiceLine.Kind.PLAN_FEE, "Basic, 2026-04-01 – 2026-04-30", Decimal("30.00")),
        (InvoiceLine.Kind.CREDIT_NOTE, "Unused time on Basic from 2026-04-16 00:00", Decimal("-15.00")),
        (InvoiceLine.Kind.PLAN_FEE, "Remaining time on Pro from 2026-04-16 00:00", Decimal("45.00")),
    ]
    assert invoice.total == Decimal("60.00")  # 30 × ½ + 90 × ½
    subscription.refresh_from_db()
    assert subscription.plan == pro
    next_grant = subscription.periods.get(index=1).included_grant
    assert next_grant.original_amount == Decimal("3000")  # the new plan from the next period on
    extra.refresh_from_db()
    assert extra.status == CreditGrant.Status.EXPIRED
    assert_ledger_consistent(wallet)


def test_downgrade_takes_back_only_unused_credits_and_credits_the_fee(plans, feature):
    basic, pro = plans
    wallet, subscription = subscribed("downgrader", pro)
    with at(utc(2026, 4, 20)):
        charge(wallet, feature, "2800", "e1")
    with at(utc(2026, 4, 23, 12)):  # 7.5 of 30 days left
        change = subscription_change_plan(subscription_id=subscription.pk, plan=basic)
    assert (change.remaining_fraction, change.credits_delta) == (Decimal("0.25"), Decimal("-500"))  # -2000 × ¼
    assert (change.unused_credit, change.remaining_charge, change.included_grant) == (
        Decimal("22.50"), Decimal("7.50"), None)
    # 500 would go, but only 200 were left unused: consumed credits stay consumed.
    taken = LedgerEntry.objects.filter(wallet=wallet, type="adjustment")
    assert list(taken.values_list("amount", flat=True)) == [Decimal("-200")]
    wallet.refresh_from_db()
    assert (wallet.policy, wallet.credit_limit, wallet.ledger_balance) == (Wallet.Policy.BLOCK, 0, 0)
    with at(utc(2026, 5, 1, 0, 5)):
        subscriptions_close_due()
    invoice = subscription.periods.get(index=0).invoice
    assert [amount for _, _, amount in lines(invoice)] == [Decimal("90.00"), Decimal("-22.50"), Decimal("7.50")]
    assert invoice.total == Decimal("75.00")
    assert_ledger_consistent(wallet)


def test_switching_from_overdraft_to_block_bills_the_overage_at_the_old_price(plans, feature):
    basic, pro = plans
    wallet, subscription = subscribed("switcher", pro)
    with at(utc(2026, 4, 5)):
        charge(wallet, feature, "3300", "e1")
    wallet.refresh_from_db()
    assert wallet.overage == Decimal("300")
    with at(utc(2026, 4, 16)):
        change = subscription_change_plan(subscription_id=subscription.pk, plan=basic)
    assert (change.overage_credits, change.overage_price) == (Decimal("300"), Decimal("0.05"))
    wallet.refresh_from_db()
    assert (wallet.overage, wallet.policy) == (0, Wallet.Policy.BLOCK)
    # -1000 included credits for the half period left; none were unused, so none taken back.
    assert not LedgerEntry.objects.filter(wallet=wallet, type="adjustment").exists()
    with at(utc(2026, 5, 1, 0, 5)):
        subscriptions_close_due()
    period = subscription.periods.get(index=0)
    assert (InvoiceLine.Kind.OVERAGE, "Overage credits under Pro until 2026-04-16 00:00", Decimal("15.00")) in lines(
        period.invoice)
    assert period.invoice.total == Decimal("90.00") - Decimal("45.00") + Decimal("15.00") + Decimal("15.00")
    assert period.overage_credits == Decimal("300")
    assert_ledger_consistent(wallet)


def test_plan_change_refusals(plans):
    basic, pro = plans
    euro = Plan.objects.create(code="euro", name="Euro", currency="EUR", base_fee=Decimal("10"))
    annual = Plan.objects.create(code="annual", name="Annual", period=Plan.Period.ANNUAL, base_fee=Decimal("300"))
    retired = Plan.objects.create(code="retired", name="Retired", active=False)
    _, subscription = subscribed("refused", basic)
    with at(utc(2026, 4, 10)):
        for plan in (basic, euro, annual, retired):
            with pytest.raises(InvalidRequest):
                subscription_change_plan(subscription_id=subscription.pk, plan=plan)
        with pytest.raises(NotFound):
            subscription_change_plan(subscription_id=10**9, plan=pro)
    with at(utc(2026, 5, 1, 0, 1)), pytest.raises(Conflict, match="close it"):
        subscription_change_plan(subscription_id=subscription.pk, plan=pro)
    with at(utc(2026, 4, 10)):
        subscription_cancel(subscription_id=subscription.pk)
        with pytest.raises(Conflict):
            subscription_change_plan(subscription_id=subscription.pk, plan=pro)
    assert not SubscriptionChange.objects.exists()


def test_cancel_now_bills_to_date_voids_the_included_credits_and_ends_it(plans, feature):
    basic, pro = plans
    wallet, subscription = subscribed("leaver", pro)
    with at(utc(2026, 4, 5)):
        charge(wallet, feature, "3100", "e1")
    with at(utc(2026, 4, 11)):  # 20 of 30 days unused
        subscription_cancel(subscription_id=subscription.pk, at_period_end=False)
        with pytest.raises(Conflict):
            subscription_cancel(subscription_id=subscription.pk, at_period_end=False)
    subscription.refresh_from_db()
    assert (subscription.status, subscription.canceled_at) == (Subscription.Status.CANCELED, utc(2026, 4, 11))
    invoice = subscription.periods.get(index=0).invoice
    assert lines(invoice) == [
        (InvoiceLine.Kind.PLAN_FEE, "Pro, 2026-04-01 – 2026-04-30", Decimal("90.00")),
        (InvoiceLine.Kind.CREDIT_NOTE, "Unused time on Pro after cancellation at 2026-04-11 00:00", Decimal("-60.00")),
        (InvoiceLine.Kind.OVERAGE, "Overage credits, 2026-04-01 – 2026-04-30", Decimal("5.00")),
    ]
    assert invoice.total == Decimal("35.00")
    wallet.refresh_from_db()
    assert (wallet.policy, wallet.credit_limit) == (Wallet.Policy.BLOCK, 0), "no unbilled overdraft after the end"
    assert wallet_balance(wallet).available == 0
    with at(utc(2026, 5, 2)):
        assert subscriptions_close_due() == 0
    assert_ledger_consistent(wallet)


def test_unused_included_credits_are_voided_when_cancelled_now(plans):
    basic, _ = plans
    _, subscription = subscribed("quitter", basic)
    with at(utc(2026, 4, 16)):
        subscription_cancel(subscription_id=subscription.pk, at_period_end=False)
    grant = subscription.periods.get(index=0).included_grant
    grant.refresh_from_db()
    assert grant.status == CreditGrant.Status.VOIDED
    assert LedgerEntry.objects.get(grant=grant, type="void").amount == Decimal("-1000")
    assert subscription.periods.get(index=0).invoice.total == Decimal("15.00")


def test_a_trial_bills_no_fee_for_its_days_and_turns_active_when_over(plans):
    basic, _ = plans
    basic.trial_days = 15
    basic.save()
    _, subscription = subscribed("trialist", basic)
    assert (subscription.status, subscription.trial_ends_at) == (Subscription.Status.TRIALING, utc(2026, 4, 16))
    with at(utc(2026, 4, 15)):
        assert subscriptions_refresh_status() == 0
    with at(utc(2026, 4, 16, 0, 1)):
        assert subscriptions_refresh_status() == 1
        assert subscriptions_refresh_status() == 0
    subscription.refresh_from_db()
    assert subscription.status == Subscription.Status.ACTIVE
    assert OutboxEvent.objects.filter(topic="subscription.status_changed").count() == 1
    with at(utc(2026, 5, 1, 0, 5)):
        subscriptions_close_due()
    invoice = subscription.periods.get(index=0).invoice
    assert lines(invoice) == [(InvoiceLine.Kind.PLAN_FEE,
                               "Basic, 2026-04-01 – 2026-04-30 (trial until 2026-04-16 00:00 not billed)",
                               Decimal("15.00"))]


def test_an_overdue_period_invoice_makes_it_past_due_until_paid(plans):
    basic, _ = plans
    _, subscription = subscribed("late", basic)
    with at(utc(2026, 5, 1, 0, 5)):
        subscriptions_close_due()
    invoice = subscription.periods.get(index=0).invoice
    assert invoice.due_at == utc(2026, 5, 31, 0, 5)
    with at(utc(2026, 5, 31)):
        assert subscriptions_refresh_status() == 0
    with at(utc(2026, 5, 31, 1)):
        assert subscriptions_refresh_status() == 1
        subscription.refresh_from_db()
        assert subscription.status == Subscription.Status.PAST_DUE
        assert subscriptions_refresh_status() == 0
        payment_record(invoice_id=invoice.pk, amount=Decimal("10.00"))
        subscription.refresh_from_db()
        assert subscription.status == Subscription.Status.PAST_DUE  # partly paid: still overdue
        payment_record(invoice_id=invoice.pk, amount=Decimal("20.00"))
    subscription.refresh_from_db()
    assert subscription.status == Subscription.Status.ACTIVE
    # A period close while another invoice is overdue keeps it past due.
    with at(utc(2026, 7, 2)):
        subscriptions_close_due()  # closes May's period (June's invoice ends up overdue on 1 July + 30)
        subscription.refresh_from_db()
        assert subscription.status == Subscription.Status.ACTIVE
    with at(utc(2026, 8, 1)):
        assert subscription_refresh_status(subscription_id=subscription.pk).status == Subscription.Status.PAST_DUE


def test_billable_fraction_measures_real_seconds_across_dst():
    start = datetime(2026, 10, 1, tzinfo=BERLIN)
    end = datetime(2026, 11, 1, tzinfo=BERLIN)  # 31 days and one hour: the October night is an hour longer
    middle = datetime(2026, 10, 25, 12, tzinfo=BERLIN)
    fraction = billable_fraction(period_start=start, period_end=end, start=middle, end=end)
    assert fraction == (Decimal(7 * 24 - 12) / Decimal(31 * 24 + 1)).quantize(Decimal("1e-10"))
    assert billable_fraction(period_start=start, period_end=end, start=start, end=end) == 1
    assert billable_fraction(period_start=start, period_end=end, start=start, end=end, trial_ends_at=end) == 0


def test_a_whole_leap_year_in_berlin_with_a_plan_change_and_a_killed_close(plans, feature):
    """Monthly from 31 January 2028 (Berlin): 29 February, both DST changes, a
    mid-year upgrade, overage, a close killed midway; a second subscription that
    nobody kills ends in exactly the same state as the killed one."""
    basic, pro = plans
    customers = [make_customer(name, timezone_name="Europe/Berlin") for name in ("year-a", "year-b")]
    with at(datetime(2028, 1, 31, 9, tzinfo=BERLIN)):
        subs = [subscription_start(customer=c, plan=basic) for c in customers]
    for index in range(12):
        subs[0].refresh_from_db()
        end = subs[0].current_period_end
        if index == 4:
            with at(datetime(2028, 6, 15, 12, tzinfo=BERLIN)):
                for sub in subs:
                    subscription_change_plan(subscription_id=sub.pk, plan=pro)
        with at(end - timedelta(days=5)):
            for n, customer in enumerate(customers):
                used = "700" if index < 4 else "2500" if index == 4 else "3500"
                assert charge(default_wallet(customer), feature, used, f"y{n}-{index}").status == "charged"
        if index == 6:
            with at(end + timedelta(hours=3)), mock.patch(
                    "billing.services.plans.invoice_issue", side_effect=RuntimeError("worker killed")):
                with pytest.raises(RuntimeError):
                    subscription_period_close(subscription_id=subs[0].pk)
        with at(end + timedelta(hours=3)):
            assert subscriptions_close_due() == 2
            assert subscriptions_close_due() == 0
    periods = list(subs[0].periods.order_by("index"))
    assert [p.starts_at.astimezone(BERLIN).date().isoformat() for p in periods[:4]] == [
        "2028-01-31", "2028-02-29", "2028-03-31", "2028-04-30"]
    assert periods[-1].starts_at.astimezone(BERLIN).date().isoformat() == "2029-01-31" and len(periods) == 13
    # Local midnights: CET before 26 March, CEST after, CET again after 29 October.
    assert (periods[1].starts_at, periods[2].starts_at) == (utc(2028, 2, 28, 23), utc(2028, 3, 30, 22))
    assert periods[8].ends_at - periods[8].starts_at == timedelta(days=31, hours=1)
    invoices = [list(Invoice.objects.filter(customer=c).order_by("issued_at")) for c in customers]
    assert [i.total for i in invoices[0]] == [i.total for i in invoices[1]] and len(invoices[0]) == 12
    assert [i.total for i in invoices[0][:4]] == [Decimal("30.00")] * 4
    assert invoices[0][5].total == Decimal("90.00") + Decimal("25.00")  # July: Pro + 500 overage credits
    assert [line.kind for line in invoices[0][4].lines.all()] == ["plan_fee", "credit_note", "plan_fee", "overage"]
    numbers = sorted(Invoice.objects.filter(year=2028).values_list("sequence", flat=True))
    assert numbers == list(range(1, len(numbers) + 1))
    for customer in customers:
        assert_ledger_consistent(default_wallet(customer))
    entries = [list(default_wallet(c).entries.order_by("sequence").values_list("type", "amount")) for c in customers]
    assert entries[0] == entries[1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    old_fee=st.decimals(min_value=0, max_value=2000, places=2),
    new_fee=st.decimals(min_value=0, max_value=2000, places=2),
    old_included=st.integers(min_value=0, max_value=5000),
    new_included=st.integers(min_value=0, max_value=5000),
    used=st.integers(min_value=0, max_value=5000),
    seconds_in=st.integers(min_value=0, max_value=30 * 24 * 3600 - 1),
)
def test_any_plan_change_bills_each_plan_for_its_share_and_keeps_the_ledger_whole(
        feature, old_fee, new_fee, old_included, new_included, used, seconds_in):
    """Whatever the fees, credits and moment: the closing invoice is the old fee
    for the share before the change plus the new fee for the share after (each
    rounded once, so within a cent), never negative; included credits never go
    below what was used; the ledger stays consistent."""
    n = Plan.objects.count()
    old = Plan.objects.create(code=f"old-{n}", name="Old", base_fee=old_fee, included_credits=old_included)
    new = Plan.objects.create(code=f"new-{n}", name="New", base_fee=new_fee, included_credits=new_included)
    customer = make_customer(f"prop-{n}", timezone_name="UTC")
    wallet = default_wallet(customer)
    with at(utc(2026, 4, 1)):
        subscription = subscription_start(customer=customer, plan=old)
    moment = utc(2026, 4, 1) + timedelta(seconds=seconds_in)
    with at(moment):
        if 0 < used <= old_included:
            charge(wallet, feature, str(used), f"p{n}")
        change = subscription_change_plan(subscription_id=subscription.pk, plan=new)
    with at(utc(2026, 5, 1, 0, 1)):
        subscriptions_close_due()
    invoice = subscription.periods.get(index=0).invoice
    share = Decimal(30 * 24 * 3600 - seconds_in) / Decimal(30 * 24 * 3600)
    exact = old_fee * (1 - share) + new_fee * share
    total = invoice.total if invoice else Decimal(0)
    assert total >= 0 and abs(total - exact) <= Decimal("0.01")
    assert change.credits_delta == round_credits((new_included - old_included) * change.remaining_fraction)
    assert_ledger_consistent(wallet)


@pytest.mark.django_db(transaction=True)
def test_close_jobs_racing_close_each_period_once_with_gapless_numbers():
    import threading

    from django.db import connection
    from django.utils import timezone

    plan = Plan.objects.create(code="race", name="Race", base_fee=Decimal("10"), included_credits=Decimal("100"))
    started = timezone.now() - timedelta(days=40)
    subscriptions = [subscription_start(customer=make_customer(f"race-{i}"), plan=plan, start_at=started)
                     for i in range(6)]
    barrier = threading.Barrier(4)
    closed, errors = [], []

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            closed.append(subscriptions_close_due())
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and sum(closed) == 6
    for subscription in subscriptions:
        subscription.refresh_from_db()
        assert subscription.period_index == 1 and subscription.periods.get(index=0).invoice.total == Decimal("10.00")
        assert_ledger_consistent(subscription.wallet)
    sequences = sorted(Invoice.objects.values_list("sequence", flat=True))
    assert sequences == list(range(1, 7))
