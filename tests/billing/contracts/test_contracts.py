"""Enterprise contracts: instalments release their credits once, true-ups bill
exactly the overage at the tiered, discounted or true-up price, statements
project the true-up, renewals roll over capped credits, amendments add credits
and change prices — every step visible as grants, ledger entries and invoices."""

from __future__ import annotations

from decimal import Decimal
from unittest import mock

import pytest
import time_machine

from billing.errors import Conflict, InvalidRequest
from billing.models import (
    Contract,
    ContractAmendment,
    CreditGrant,
    Invoice,
    InvoiceLine,
    LedgerEntry,
    TrueUp,
    Wallet,
)
from billing.services import contracts as contracts_service
from billing.services.contracts import (
    contract_activate,
    contract_add_credits,
    contract_change_price,
    contract_create,
    contract_instalment_release,
    contract_price,
    contract_renew,
    contract_statement,
    contract_true_up_settle,
    contracts_run_due,
)
from tests.billing.contracts.conftest import START, active_contract, at, charge, tiered_contract
from tests.conftest import assert_ledger_consistent

pytestmark = pytest.mark.django_db


def lines(invoice: Invoice) -> list[tuple[str, Decimal, Decimal, Decimal]]:
    return [(line.kind, line.quantity, line.unit_price, line.amount) for line in invoice.lines.all()]


def test_activation_releases_the_first_instalment_at_the_tiered_discounted_price(customer, wallet):
    contract = tiered_contract(customer)
    assert contract.status == Contract.Status.DRAFT and not CreditGrant.objects.filter(wallet=wallet).exists()
    with time_machine.travel(START, tick=False):
        contract = contract_activate(contract_id=contract.pk)
    contract.refresh_from_db()
    assert contract.status == Contract.Status.ACTIVE and contract_price(contract, at=START) == Decimal("0.0081")
    assert [(i.due_at, i.credits) for i in contract.instalments.all()] == [
        (at(2026, 1, 1), Decimal("50000")), (at(2026, 4, 1), Decimal("50000")),
        (at(2026, 7, 1), Decimal("50000")), (at(2026, 10, 1), Decimal("50000"))]
    assert [(t.period_start, t.period_end) for t in contract.true_ups.all()] == [(at(2026, 1, 1), at(2027, 1, 1))]
    wallet.refresh_from_db()
    assert (wallet.policy, wallet.credit_limit) == (Wallet.Policy.OVERDRAFT, Decimal("200000"))

    first = contract.instalments.get(index=0)
    assert first.released_at == START and first.amount == Decimal("405.00")
    assert lines(first.invoice) == [(InvoiceLine.Kind.CONTRACT, Decimal("50000"), Decimal("0.0081"),
                                     Decimal("405.00"))]
    assert first.invoice.status == Invoice.Status.ISSUED and first.invoice.number
    grant = first.grant
    assert (grant.kind, grant.source, grant.original_amount, grant.per_unit_cost_basis, grant.price_paid) == (
        CreditGrant.Kind.CONTRACT, CreditGrant.Source.CONTRACT, Decimal("50000"), Decimal("0.0081"),
        Decimal("405.00"))
    assert grant.expires_at == at(2027, 1, 1)
    assert not contract.instalments.filter(index__gt=0, released_at__isnull=False).exists()
    assert_ledger_consistent(wallet)


def test_a_year_with_overage_runs_to_an_exact_true_up_once(customer, wallet, feature):
    contract = active_contract(customer, true_up_price=Decimal("0.012"))
    with time_machine.travel(at(2026, 3, 20), tick=False):
        charge(wallet, feature, "60000", "q1")  # 10,000 beyond the first instalment: overdraft
    wallet.refresh_from_db()
    assert wallet.overage == Decimal("10000")

    with time_machine.travel(at(2026, 4, 1, 0, 5), tick=False):
        assert contracts_run_due() == 1
        assert contracts_run_due() == 0
    wallet.refresh_from_db()
    assert wallet.overage == 0  # the second instalment repaid the overdraft first
    second = contract.instalments.get(index=1).grant
    assert second.remaining == Decimal("40000")
    assert LedgerEntry.objects.filter(wallet=wallet, grant=second, type="overage_settled").get().amount == -10000

    with time_machine.travel(at(2026, 12, 15), tick=False):
        assert contracts_run_due() == 2  # the July and October instalments, late
        charge(wallet, feature, "152345.5", "rest-of-year")  # 212,345.5 consumed in all
    wallet.refresh_from_db()
    assert wallet.overage == Decimal("12345.5")
    true_up = contract.true_ups.get()
    with time_machine.travel(at(2026, 12, 31), tick=False), pytest.raises(Conflict):
        contract_true_up_settle(true_up_id=true_up.pk)

    with time_machine.travel(at(2027, 1, 1, 0, 10), tick=False):
        assert contracts_run_due() == 1
        assert contracts_run_due() == 0
        assert contract_true_up_settle(true_up_id=true_up.pk).settled_at == at(2027, 1, 1, 0, 10)
    true_up.refresh_from_db()
    assert (true_up.committed, true_up.consumed, true_up.overage_credits, true_up.unit_price, true_up.amount) == (
        Decimal("200000"), Decimal("212345.5"), Decimal("12345.5"), Decimal("0.012"), Decimal("148.15"))
    assert lines(true_up.invoice) == [(InvoiceLine.Kind.TRUE_UP, Decimal("12345.5"), Decimal("0.012"),
                                       Decimal("148.15"))]
    assert true_up.grant.per_unit_cost_basis == Decimal("0.012") and true_up.grant.price_paid == Decimal("148.15")
    wallet.refresh_from_db()
    assert wallet.overage == 0 and wallet.credit_limit == 0  # the term is over: no more borrowing
    contract.refresh_from_db()
    assert contract.status == Contract.Status.ENDED
    assert Invoice.objects.filter(customer=customer).count() == 5  # four instalments and one true-up
    assert_ledger_consistent(wallet)


def test_the_true_up_price_defaults_to_the_effective_contract_price(customer, wallet, feature):
    contract = tiered_contract(customer, payment_schedule=Contract.PaymentSchedule.UPFRONT,
                               true_up_cadence=Contract.Cadence.QUARTERLY)
    with time_machine.travel(START, tick=False):
        contract = contract_activate(contract_id=contract.pk)
        charge(wallet, feature, "200001", "everything-at-once")
    assert contract.true_ups.count() == 4 and contract.instalments.count() == 1
    with time_machine.travel(at(2026, 4, 1, 1), tick=False):
        contracts_run_due()
    first = contract.true_ups.order_by("period_end").first()
    assert (first.committed, first.consumed, first.overage_credits, first.unit_price, first.amount) == (
        Decimal("50000"), Decimal("200001"), Decimal("1"), Decimal("0.0081"), Decimal("0.01"))
    with time_machine.travel(at(2026, 7, 1, 1), tick=False):
        contracts_run_due()
    second = contract.true_ups.order_by("period_end")[1]
    assert second.settled_at is not None and second.invoice is None and second.amount == 0
    assert_ledger_consistent(wallet)


def test_a_killed_run_rolls_back_whole_and_the_rerun_bills_once(customer, wallet, feature):
    contract = tiered_contract(customer)
    with time_machine.travel(START, tick=False):
        contract = contract_activate(contract_id=contract.pk)
        charge(wallet, feature, "250000", "burst")
    real_audit = contracts_service.audit_record

    def dies_at_the_true_up(**kwargs):
        if kwargs["action"] == "contract.true_up":
            raise RuntimeError("worker killed")
        return real_audit(**kwargs)

    with time_machine.travel(at(2027, 1, 2), tick=False):
        with mock.patch.object(contracts_service, "audit_record", side_effect=dies_at_the_true_up), \
                pytest.raises(RuntimeError):
            contracts_run_due()
        assert contract.instalments.filter(released_at__isnull=False).count() == 1
        assert Invoice.objects.filter(customer=customer).count() == 1
        assert contracts_run_due() == 4  # three instalments, then the true-up
        assert contracts_run_due() == 0
    assert contract.instalments.filter(released_at__isnull=False).count() == 4
    assert CreditGrant.objects.filter(wallet=wallet, kind="contract").count() == 5
    true_up = contract.true_ups.get()
    assert true_up.overage_credits == Decimal("50000") and true_up.amount == Decimal("405.00")
    assert Invoice.objects.filter(customer=customer).count() == 5
    assert_ledger_consistent(wallet)


def test_instalments_wait_for_their_due_date_and_for_an_earlier_true_up(customer, wallet, feature):
    contract = tiered_contract(customer, term_months=24, true_up_cadence=Contract.Cadence.ANNUAL)
    with time_machine.travel(START, tick=False):
        contract = contract_activate(contract_id=contract.pk)
        second = contract.instalments.get(index=1)
        with pytest.raises(Conflict):
            contract_instalment_release(instalment_id=second.pk)
        charge(wallet, feature, "250000", "big-year")
    with time_machine.travel(at(2026, 12, 31), tick=False):
        for index in (1, 2, 3):
            contract_instalment_release(instalment_id=contract.instalments.get(index=index).pk)
        assert contract_instalment_release(instalment_id=second.pk).released_at == at(2026, 12, 31)  # once
    year_two = contract.instalments.get(index=4)
    assert year_two.expires_at == at(2028, 1, 1)
    with time_machine.travel(at(2027, 1, 1, 1), tick=False):
        with pytest.raises(Conflict, match="true-up first"):
            contract_instalment_release(instalment_id=year_two.pk)
        contracts_run_due()
    first_true_up = contract.true_ups.order_by("period_end").first()
    assert first_true_up.overage_credits == Decimal("50000")  # not eaten by year two's credits
    year_two.refresh_from_db()
    assert year_two.grant.remaining == Decimal("50000")
    assert_ledger_consistent(wallet)


def test_statement_projects_consumption_and_the_true_up_from_the_burn_rate(customer, wallet, feature):
    contract = active_contract(customer, payment_schedule=Contract.PaymentSchedule.UPFRONT,
                               true_up_price=Decimal("0.01"))
    with time_machine.travel(at(2026, 1, 6), tick=False):
        charge(wallet, feature, "10000", "first-days")
    with time_machine.travel(at(2026, 1, 11), tick=False):
        statement = contract_statement(contract=contract)
    assert (statement.period_start, statement.period_end) == (START, at(2027, 1, 1))
    assert statement.committed == Decimal("200000") and statement.consumed == Decimal("10000")
    assert statement.burn_rate_per_day == Decimal("1000")
    assert statement.projected_consumption == Decimal("365000")
    assert statement.credits_available == Decimal("190000") and statement.credits_to_release == 0
    # 355,000 still to come against 190,000 usable credits: 165,000 over at 0.01.
    assert statement.projected_overage == Decimal("165000")
    assert statement.projected_true_up_amount == Decimal("1650.00")
    assert statement.effective_price == Decimal("0.0081")
    assert (statement.term_committed, statement.term_consumed, statement.projected_term_consumption) == (
        Decimal("200000"), Decimal("10000"), Decimal("365000"))


def test_statement_counts_unreleased_instalments_and_outstanding_overage(customer, wallet, feature):
    contract = active_contract(customer, true_up_price=Decimal("0.01"))
    with time_machine.travel(at(2026, 1, 31), tick=False):
        charge(wallet, feature, "62000", "january")
    with time_machine.travel(at(2026, 2, 1), tick=False):
        statement = contract_statement(contract=contract)
    assert statement.outstanding_overage == Decimal("12000") and statement.credits_to_release == Decimal("150000")
    assert statement.burn_rate_per_day == Decimal("2000")
    assert statement.projected_consumption == Decimal("730000")
    assert statement.projected_overage == Decimal("730000") - Decimal("200000")
    assert statement.projected_true_up_amount == Decimal("5300.00")


def test_renewal_extends_the_term_and_rolls_over_the_capped_share(customer, wallet, feature):
    contract = tiered_contract(customer, payment_schedule=Contract.PaymentSchedule.UPFRONT,
                               rollover_percent=Decimal("25"))
    with time_machine.travel(START, tick=False):
        contract = contract_activate(contract_id=contract.pk)
        charge(wallet, feature, "160000", "most-of-it")
    with time_machine.travel(at(2026, 12, 1), tick=False):
        balance_before = Wallet.objects.get(pk=wallet.pk).ledger_balance
        renewal = contract_renew(contract_id=contract.pk, idempotency_key="crm-renewal-1")
        assert contract_renew(contract_id=contract.pk, idempotency_key="crm-renewal-1").pk == renewal.pk
    contract.refresh_from_db()
    assert contract.ends_at == at(2028, 1, 1) and contract.status == Contract.Status.ACTIVE
    assert renewal.kind == ContractAmendment.Kind.RENEWAL and renewal.credits == Decimal("10000")
    rolled = renewal.grant
    assert (rolled.kind, rolled.original_amount, rolled.expires_at, rolled.per_unit_cost_basis) == (
        CreditGrant.Kind.ROLLOVER, Decimal("10000"), at(2028, 1, 1), Decimal("0.0081"))
    first = contract.instalments.get(index=0).grant
    first.refresh_from_db()
    assert first.remaining == Decimal("30000")  # 40,000 unused, 25 % rolled over
    assert [(e.type, e.amount) for e in LedgerEntry.objects.filter(reference=f"contract:{contract.pk}:renewal:"
                                                                              f"{renewal.pk}").order_by("sequence")] \
        == [("rollover_out", Decimal("-10000")), ("rollover_in", Decimal("10000"))]
    assert Wallet.objects.get(pk=wallet.pk).ledger_balance == balance_before
    assert [(i.due_at, i.credits) for i in contract.instalments.all()] == [
        (at(2026, 1, 1), Decimal("200000")), (at(2027, 1, 1), Decimal("200000"))]
    assert list(contract.true_ups.values_list("period_end", flat=True)) == [at(2027, 1, 1), at(2028, 1, 1)]
    with time_machine.travel(at(2027, 1, 1, 1), tick=False):
        contracts_run_due()
        first.refresh_from_db()
        rolled.refresh_from_db()
        assert first.status == "active"  # expires by the expiry job; the rollover stays usable
        assert rolled.remaining == Decimal("10000") and rolled.is_usable()
    assert contract.true_ups.order_by("period_end").first().settled_at is not None
    assert_ledger_consistent(wallet)


def test_renewal_refuses_ended_contracts_and_bad_lengths(customer, wallet):
    contract = tiered_contract(customer)
    with time_machine.travel(START, tick=False):
        contract = contract_activate(contract_id=contract.pk)
        with pytest.raises(InvalidRequest):
            contract_renew(contract_id=contract.pk, months=5)  # quarterly schedule: whole quarters
    with time_machine.travel(at(2027, 1, 1, 2), tick=False):
        with pytest.raises(Conflict):
            contract_renew(contract_id=contract.pk)


def test_amendment_adds_credits_with_a_grant_and_an_invoice(customer, wallet, feature):
    contract = tiered_contract(customer)
    with time_machine.travel(START, tick=False):
        contract = contract_activate(contract_id=contract.pk)
        charge(wallet, feature, "55000", "over")
    with time_machine.travel(at(2026, 2, 10), tick=False):
        amendment = contract_add_credits(contract_id=contract.pk, credits=Decimal("30000"), note="new team",
                                         idempotency_key="crm-add-1")
        again = contract_add_credits(contract_id=contract.pk, credits=Decimal("30000"), note="new team",
                                     idempotency_key="crm-add-1")
    assert again.pk == amendment.pk
    assert lines(amendment.invoice) == [(InvoiceLine.Kind.CONTRACT, Decimal("30000"), Decimal("0.0081"),
                                         Decimal("243.00"))]
    grant = amendment.grant
    assert (grant.kind, grant.original_amount, grant.remaining, grant.expires_at) == (
        CreditGrant.Kind.CONTRACT, Decimal("30000"), Decimal("25000"), at(2027, 1, 1))  # repaid the 5,000 overdraft
    with time_machine.travel(at(2026, 2, 11), tick=False):
        assert contract_statement(contract=contract).committed == Decimal("230000")
    assert_ledger_consistent(wallet)


def test_price_change_applies_to_instalments_from_its_date(customer, wallet):
    contract = active_contract(customer)
    with time_machine.travel(at(2026, 3, 1), tick=False):
        with pytest.raises(Conflict):
            contract_change_price(contract_id=contract.pk, effective_at=START, list_price=Decimal("0.02"))
        contract_change_price(contract_id=contract.pk, effective_at=at(2026, 7, 1), list_price=Decimal("0.008"),
                              true_up_price=Decimal("0.011"))
    with time_machine.travel(at(2026, 7, 1, 1), tick=False):
        contracts_run_due()
    april, july = contract.instalments.get(index=1), contract.instalments.get(index=2)
    assert (april.unit_price, april.amount) == (Decimal("0.0081"), Decimal("405.00"))
    assert (july.unit_price, july.amount) == (Decimal("0.0072"), Decimal("360.00"))
    assert july.grant.per_unit_cost_basis == Decimal("0.0072")
    assert contracts_service.contract_true_up_price(contract, at=at(2027, 1, 1)) == Decimal("0.011")


def test_a_spend_commitment_buys_its_credits_at_the_tier_it_reaches(customer, wallet):
    contract = active_contract(customer, committed_credits=None, committed_spend=Decimal("1620.00"))
    contract.refresh_from_db()
    assert contract.committed_credits == Decimal("200000")
    assert contract.instalments.get(index=0).amount == Decimal("405.00")


@pytest.mark.parametrize(("overrides", "field"), [
    ({"committed_spend": Decimal("100")}, "committed_credits"),
    ({"term_months": 10}, "term_months"),
    ({"discount_percent": Decimal("120")}, "discount_percent"),
    ({"committed_credits": Decimal("0")}, "committed_credits"),
])
def test_inconsistent_terms_are_refused_naming_the_field(customer, overrides, field):
    with pytest.raises(InvalidRequest) as refused:
        tiered_contract(customer, **overrides)
    assert field in refused.value.details


def test_one_live_contract_per_wallet(customer):
    tiered_contract(customer)
    with pytest.raises(Conflict):
        contract_create(customer=customer, starts_at=START, list_price=Decimal("0.01"),
                        committed_credits=Decimal("1000"))
    assert TrueUp.objects.count() == 0


def test_a_free_spend_commitment_is_refused_at_activation(customer):
    contract = tiered_contract(customer, committed_credits=None, committed_spend=Decimal("100.00"),
                               list_price=Decimal("0"), tiers=[])
    with pytest.raises(InvalidRequest) as refused:
        contract_activate(contract_id=contract.pk)
    assert "list_price" in refused.value.details
    contract.refresh_from_db()
    assert contract.status == Contract.Status.DRAFT and not contract.instalments.exists()
