"""Contracts under Hypothesis (any commitment, price, discount and consumption:
the invoices bill exactly the instalments and the overage, the ledger stays
whole) and under concurrent job runs (each instalment and true-up once)."""

from __future__ import annotations

from decimal import Decimal
from itertools import count

import pytest
import time_machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.models import Contract, CreditGrant, Invoice, InvoiceLine
from billing.numbers import round_money, round_rate
from billing.services.contracts import contract_activate, contract_run_due, contracts_run_due
from billing.services.grants import default_wallet
from tests.billing.contracts.conftest import START, at, charge, tiered_contract
from tests.billing.test_concurrency import run_threads
from tests.conftest import assert_ledger_consistent
from tests.factories import make_customer, make_feature

_customers = count(1)


@pytest.mark.django_db
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    committed=st.integers(min_value=1_000, max_value=2_000_000),
    list_price=st.decimals(min_value=Decimal("0.0001"), max_value=Decimal("0.05"), places=4),
    discount=st.decimals(min_value=Decimal("0"), max_value=Decimal("40"), places=2),
    true_up_price=st.one_of(st.none(), st.decimals(min_value=Decimal("0.001"), max_value=Decimal("0.1"),
                                                    places=5)),
    consumed_share=st.decimals(min_value=Decimal("0"), max_value=Decimal("1.9"), places=3),
)
def test_a_year_bills_exactly_the_instalments_and_the_overage(feature, committed, list_price, discount,
                                                              true_up_price, consumed_share):
    customer = make_customer(f"prop-{next(_customers)}")
    wallet = default_wallet(customer)
    contract = tiered_contract(customer, committed_credits=Decimal(committed), list_price=list_price, tiers=[],
                               discount_percent=discount, true_up_price=true_up_price)
    consumed = (Decimal(committed) * consumed_share).quantize(Decimal("0.001"))
    with time_machine.travel(START, tick=False):
        contract_activate(contract_id=contract.pk)
    with time_machine.travel(at(2026, 12, 1), tick=False):
        contracts_run_due()
        if consumed > 0:
            charge(wallet, feature, consumed, f"use-{contract.pk}")
    with time_machine.travel(at(2027, 1, 1, 0, 5), tick=False):
        contracts_run_due()

    price = round_rate(list_price * (100 - discount) / 100)
    overage = max(consumed - Decimal(committed), Decimal(0))
    true_up = contract.true_ups.get()
    assert true_up.overage_credits == overage
    assert true_up.amount == (round_money(overage * (true_up_price or price), "USD") if overage else 0)
    instalments = list(contract.instalments.all())
    assert sum(i.credits for i in instalments) == committed
    assert all(i.amount == round_money(i.credits * price, "USD") for i in instalments)
    billed = Invoice.objects.filter(customer=customer).exclude(status="void")
    by_kind = {kind: sum(line.amount for inv in billed for line in inv.lines.all() if line.kind == kind)
               for kind in (InvoiceLine.Kind.CONTRACT, InvoiceLine.Kind.TRUE_UP)}
    assert by_kind[InvoiceLine.Kind.CONTRACT] == sum(i.amount for i in instalments)
    assert by_kind[InvoiceLine.Kind.TRUE_UP] == true_up.amount
    for grant in CreditGrant.objects.filter(wallet=wallet, kind="contract"):
        assert grant.price_paid == round_money(grant.original_amount * grant.per_unit_cost_basis, "USD")
    wallet.refresh_from_db()
    assert wallet.overage == 0
    assert_ledger_consistent(wallet)


@pytest.mark.django_db(transaction=True)
def test_concurrent_job_runs_release_and_settle_each_step_once():
    feature = make_feature("api-call", "1", effective_from=at(2025, 1, 1))
    customer = make_customer("racer", email="ap@racer.test")
    wallet = default_wallet(customer)
    contract = tiered_contract(customer, true_up_cadence=Contract.Cadence.QUARTERLY)
    with time_machine.travel(START, tick=False):
        contract_activate(contract_id=contract.pk)
        charge(wallet, feature, "120000", "burst")
    with time_machine.travel(at(2026, 7, 2), tick=False):
        run_threads(6, lambda i: contracts_run_due() if i % 2 else contract_run_due(contract_id=contract.pk))
    assert contract.instalments.filter(released_at__isnull=False).count() == 3
    settled = contract.true_ups.filter(settled_at__isnull=False).order_by("period_end")
    assert settled.count() == 2
    # Q1's overage is settled before April's credits arrive; Q2 used none of them.
    assert [t.overage_credits for t in settled] == [Decimal("70000"), Decimal("0")]
    assert Invoice.objects.filter(customer=customer).count() == 3 + 1
    assert len({inv.number for inv in Invoice.objects.filter(customer=customer)}) == 4
    assert_ledger_consistent(wallet)
