"""The monthly revenue report on a hand-checked month (March 2030, UTC), its
reconciliation, and the revenue schedule of one grant."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
import time_machine

from billing.models import Plan
from billing.services.grants import default_wallet, grant_create, grant_expire
from billing.services.invoices import invoice_add_line, invoice_create_draft, invoice_issue
from billing.services.packs import pack_purchase
from billing.services.plans import subscription_period_close, subscription_start
from billing.services.refunds import refund_approve, refund_request
from billing.services.revenue import grant_schedule, revenue_report
from tests.billing.revenue.conftest import charge
from tests.factories import make_customer, make_feature

pytestmark = pytest.mark.django_db
D = Decimal


def at(month, day, hour=12):
    return time_machine.travel(datetime(2030, month, day, hour, tzinfo=UTC), tick=False)


@pytest.fixture
def march(pack, support, finance):
    """Pack 1,000 credits for 100.00 (Feb 20); 100 used in February; in March:
    333.333333 used from it, a 300-credit grant for 45.00 (Mar 10, expiring
    Mar 20) of which 100 used, 166.666667 refunded (Mar 25), 30 promotional
    credits used, a plan at 31.00 a month from Mar 17 (billed Apr 17), an
    overage line of 12.34 and a true-up line of 20.00 (Mar 28)."""
    with at(2, 20):
        feature = make_feature("api-call", "1")
        customer = make_customer("hand")
        wallet = default_wallet(customer)
        purchase = pack_purchase(wallet=wallet, pack=pack)
        charge(wallet, feature, 100)
    with at(3, 5):
        charge(wallet, feature, D("333.333333"))
    with at(3, 10):
        short = grant_create(wallet=wallet, kind="prepaid", amount=D("300"), price_paid=D("45.00"),
                             expires_at=datetime(2030, 3, 20, tzinfo=UTC), require_approval=False)
        promo = grant_create(wallet=wallet, kind="promotional", amount=D("30"), priority=10,
                             require_approval=False)
    with at(3, 12):
        charge(wallet, feature, 130)  # 30 promotional (priority 10) then 100 from the short grant
    with at(3, 20, 1):
        grant_expire(grant_id=short.pk)
    with at(3, 25):
        refund = refund_request(grant_id=purchase.grant_id, credits=D("166.666667"), reason="Unused",
                                requested_by=support)
        refund_approve(refund_id=refund.pk, user=finance)
    with at(3, 28):
        invoice = invoice_create_draft(customer=customer)
        invoice_add_line(invoice_id=invoice.pk, kind="overage", description="Overage", quantity=D("123.4"),
                         unit_price=D("0.1"))
        invoice_add_line(invoice_id=invoice.pk, kind="true_up", description="True-up", quantity=D("1"),
                         unit_price=D("20"))
        invoice_issue(invoice_id=invoice.pk)
    plan = Plan.objects.create(code="basic", name="Basic", base_fee=D("31.00"))
    subscriber = make_customer("planned")
    with at(3, 17, 0):
        subscription = subscription_start(customer=subscriber, plan=plan)
    with at(4, 17, 1):
        assert subscription_period_close(subscription_id=subscription.pk) is not None
    return {"purchase": purchase, "short": short, "promo": promo}


def test_the_march_report_matches_the_hand_computed_figures(march):
    report = revenue_report(year=2030, month=3, currency="USD")
    assert report.opening_deferred == D("90.00")       # 100.00 − 10.00 recognized in February
    assert report.new_deferred == D("45.00")
    assert report.usage == D("48.33")                  # 43.33 − 10.00 on the pack, 15.00 on the short grant
    assert report.breakage == D("30.00")               # 45.00 − 15.00 when the short grant expired
    assert report.refunds == D("16.67")                # 166.666667 × 0.10
    assert report.closing_deferred == D("40.00")       # 400 unused pack credits × 0.10
    assert report.plan_fees == D("15.00")              # 15 of the period's 31 days fall in March
    assert (report.overage, report.true_up) == (D("12.34"), D("20.00"))
    assert report.recognized_total == D("125.67")
    assert report.consumed_credits == D("433.333333") and report.lapsed_credits == D("300") - D("100")
    assert report.refunded_credits == D("166.666667") and report.credit_notes == 1
    assert report.promotional_credits == D("30") and report.list_price == D("0.1")
    assert report.promotion_cost == D("3.00")
    assert report.reconciles, [(c.label, c.expected, c.actual) for c in report.checks if not c.ok]

    april = revenue_report(year=2030, month=4, currency="USD")
    assert april.opening_deferred == D("40.00") and april.plan_fees == D("16.00")
    assert april.usage == april.breakage == april.refunds == 0


def test_the_february_report_and_a_configured_list_price(march, settings):
    settings.CREDITDESK_PROMOTION_LIST_PRICE = D("0.25")
    february = revenue_report(year=2030, month=2, currency="USD")
    assert (february.opening_deferred, february.new_deferred, february.usage, february.closing_deferred) == (
        0, D("100.00"), D("10.00"), D("90.00"))
    assert revenue_report(year=2030, month=3, currency="USD").promotion_cost == D("7.50")


def test_a_credit_note_changed_behind_the_services_back_breaks_the_reconciliation(march):
    from billing.models import CreditNote

    CreditNote.objects.update(amount=D("16.00"))
    report = revenue_report(year=2030, month=3, currency="USD")
    assert not report.reconciles
    assert [check.label for check in report.checks if not check.ok] == [
        "Credit notes = credits × cost basis, rounded once (± one minor unit on a grant's last refund)"]


def test_the_schedule_of_one_grant_by_month(march):
    with at(5, 1):
        schedule = grant_schedule(march["purchase"].grant)
    assert schedule.paid == D("100.00")
    assert [(m.month.month, m.recognized, m.refunded, m.deferred_at_end) for m in schedule.months] == [
        (2, D("10.00"), 0, D("90.00")), (3, D("33.33"), D("16.67"), D("40.00")), (4, 0, 0, D("40.00")),
        (5, 0, 0, D("40.00"))]
    assert schedule.now.deferred == D("40.00")
    with at(5, 1):
        short = grant_schedule(march["short"])
    assert [(m.month.month, m.recognized, m.breakage) for m in short.months][0] == (3, D("15.00"), D("30.00"))
    assert not grant_schedule(march["promo"]).is_paid_grant


def test_a_plan_change_credit_nets_off_the_period_fee(db):
    from billing.models import InvoiceLine
    from billing.services.plans import subscription_change_plan

    small = Plan.objects.create(code="small", name="Small", base_fee=D("30.00"))
    big = Plan.objects.create(code="big", name="Big", base_fee=D("60.00"))
    customer = make_customer("upgrader")
    with at(6, 1, 0):
        subscription = subscription_start(customer=customer, plan=small)
    with at(6, 16, 0):
        subscription_change_plan(subscription_id=subscription.pk, plan=big)
    with at(7, 1, 1):
        period = subscription_period_close(subscription_id=subscription.pk)
    lines = {line.kind: line.amount for line in InvoiceLine.objects.filter(invoice=period.invoice)}
    assert lines[InvoiceLine.Kind.CREDIT_NOTE] < 0
    june = revenue_report(year=2030, month=6, currency="USD")
    assert june.plan_fees == period.invoice.subtotal  # 30 + (60 − 30) × half the period: the whole June period
    assert june.plan_fees == D("45.00") and june.reconciles
