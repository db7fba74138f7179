"""DESIGN.md invariant 7 under Hypothesis: for every paid grant, recognized +
deferred + breakage + refunded = money paid, to the cent, after random
purchases, charges, expiries, voids and refunds — checked against sums taken
independently from the ledger and the credit notes, month by month and in
each month's report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.db import transaction
from django.db.models import Sum
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from billing.errors import BillingError
from billing.models import CreditGrant, CreditNote, LedgerEntry
from billing.numbers import round_money
from billing.services.grants import default_wallet, grant_create, grant_void, grants_expire_due
from billing.services.refunds import refund_approve, refund_request
from billing.services.revenue import (
    LAPSE_TYPES,
    NOT_CONSUMPTION,
    grant_figures_now,
    grant_schedule,
    month_of,
    next_month,
    revenue_report,
)
from billing.services.usage import ChargeRequest, usage_charge
from tests.factories import make_customer, make_feature

START = datetime(2030, 1, 10, 9, 0, tzinfo=UTC)
CENT = Decimal("0.01")

buy = st.tuples(st.just("buy"), st.integers(1, 5000), st.integers(1, 90000), st.sampled_from([None, 5, 40]),
                st.sampled_from(["prepaid", "contract"]))
charge = st.tuples(st.just("charge"), st.decimals(Decimal("0.000001"), Decimal("2500"), places=6))
pass_time = st.tuples(st.just("pass"), st.integers(1, 20))
refund = st.tuples(st.just("refund"), st.integers(0, 9), st.one_of(st.none(), st.integers(1, 99)))
void = st.tuples(st.just("void"), st.integers(0, 9))
# Every history starts with a purchase, so most charges find credits to consume.
operations = st.tuples(buy, st.lists(st.one_of(buy, charge, charge, pass_time, refund, void), max_size=14)).map(
    lambda t: [t[0], *t[1]])


def _sum(qs) -> Decimal:
    return qs.aggregate(total=Sum("amount"))["total"] or Decimal(0)


@pytest.mark.django_db
def test_revenue_invariant_holds_for_any_history(finance, finance2):
    maker, checker = finance, finance2
    with time_machine.travel(START, tick=False):
        feature = make_feature("api-call", "1")
        wallet = default_wallet(make_customer("hyp"))

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture],
              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    @given(operations)
    def run(ops):
        savepoint = transaction.savepoint()
        try:
            _play(ops, wallet=wallet, feature=feature, maker=maker, checker=checker)
        finally:
            transaction.savepoint_rollback(savepoint)

    run()


def _play(ops, *, wallet, feature, maker, checker):
    clock = START
    paid: dict[int, Decimal] = {}
    events = 0
    for op in ops:
        with time_machine.travel(clock, tick=False):
            kind = op[0]
            if kind == "buy":
                _, credits, cents, days, grant_kind = op
                grant = grant_create(
                    wallet=wallet, kind=grant_kind, amount=Decimal(credits), price_paid=Decimal(cents) / 100,
                    expires_at=clock + timedelta(days=days) if days else None, require_approval=False)
                paid[grant.pk] = Decimal(cents) / 100
            elif kind == "charge":
                events += 1
                usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                           quantity=op[1], event_id=f"h{events}"))
            elif kind == "pass":
                clock += timedelta(days=op[1])
                with time_machine.travel(clock, tick=False):
                    grants_expire_due(now=clock)
            elif paid:
                grant_id = sorted(paid)[op[1] % len(paid)]
                try:
                    if kind == "void":
                        grant_void(grant_id=grant_id, reason="test")
                    else:
                        remaining = CreditGrant.objects.get(pk=grant_id).remaining
                        credits = None if op[2] is None else (remaining * op[2] / 100).quantize(Decimal("0.000001"))
                        request = refund_request(grant_id=grant_id, credits=credits or None, reason="hyp",
                                                 requested_by=maker)
                        refund_approve(refund_id=request.pk, user=checker)
                except BillingError:
                    pass
    _check(paid, now=clock + timedelta(seconds=1))


def _check(paid: dict[int, Decimal], *, now: datetime) -> None:
    totals = {"recognized": Decimal(0), "breakage": Decimal(0), "refunded": Decimal(0), "deferred": Decimal(0)}
    for grant_id, money in paid.items():
        grant = CreditGrant.objects.get(pk=grant_id)
        f = grant_figures_now(grant)
        assert f.paid == money
        assert f.recognized + f.deferred + f.breakage + f.refunded == money
        assert min(f.recognized, f.deferred, f.breakage, f.refunded) >= 0
        entries = LedgerEntry.objects.filter(grant=grant)
        consumed = -_sum(entries.exclude(type__in=NOT_CONSUMPTION))
        lapsed = -_sum(entries.filter(type__in=LAPSE_TYPES))
        notes = CreditNote.objects.filter(grant=grant)
        assert f.refunded == _sum(notes)
        assert -_sum(entries.filter(type="refund")) == (notes.aggregate(c=Sum("credits"))["c"] or 0)
        for note in notes:
            exact = round_money(note.credits * grant.per_unit_cost_basis, "USD")
            assert abs(note.amount - exact) <= CENT
        proportional = round_money(money * consumed / grant.original_amount, "USD")
        if grant.remaining > 0:
            assert (f.recognized, f.breakage) == (proportional, 0)
        elif lapsed > 0:
            assert f.recognized == proportional and f.breakage == money - proportional - f.refunded
        else:
            assert f.recognized == money - f.refunded and f.breakage == 0
        unused = round_money(money * grant.remaining / grant.original_amount, "USD")
        assert abs(f.deferred - unused) <= CENT * (1 + notes.count())
        if grant.remaining == 0:  # (a tiny price may leave nothing deferred on unused credits)
            assert f.deferred == 0
        schedule = grant_schedule(grant, now=now)
        assert sum((m.recognized for m in schedule.months), Decimal(0)) == f.recognized
        assert sum((m.breakage for m in schedule.months), Decimal(0)) == f.breakage
        assert sum((m.refunded for m in schedule.months), Decimal(0)) == f.refunded
        assert schedule.months[-1].deferred_at_end == f.deferred
        for key in totals:
            totals[key] += getattr(f, key)
    month, last = month_of(START), month_of(now)
    reported = {"recognized": Decimal(0), "breakage": Decimal(0), "refunded": Decimal(0)}
    while True:
        report = revenue_report(year=month[0], month=month[1], currency="USD")
        assert report.reconciles, [(c.label, c.expected, c.actual) for c in report.checks if not c.ok]
        reported["recognized"] += report.usage
        reported["breakage"] += report.breakage
        reported["refunded"] += report.refunds
        if month == last:
            break
        month = next_month(*month)
    assert report.closing_deferred == totals["deferred"]
    assert reported == {k: totals[k] for k in reported}
