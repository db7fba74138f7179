"""Contracts in the admin (finance drafts, activates, runs the true-up, renews,
amends; auditors read; other roles see nothing), over the API (list, detail,
statement with string decimals, errors in the envelope) and as a beat job."""

from __future__ import annotations

from decimal import Decimal

import pytest
import time_machine
from django.urls import reverse

from billing import roles
from billing.models import AuditEvent, Contract, ContractAmendment, InvoiceLine, JobRun, TrueUp, Wallet
from billing.services.contracts import contract_activate
from billing.tasks import contracts_run_due
from config.schedule import SCHEDULE
from tests.billing.admin.conftest import make_staff, role_groups, staff_client  # noqa: F401 - fixtures
from tests.billing.api.conftest import admin_api, assert_error, make_api, read_api, usage_api  # noqa: F401
from tests.billing.contracts.conftest import START, at, charge, tiered_contract
from tests.conftest import assert_ledger_consistent

pytestmark = pytest.mark.django_db


@pytest.fixture
def active(customer, wallet, feature):
    contract = tiered_contract(customer, true_up_cadence=Contract.Cadence.QUARTERLY,
                               true_up_price=Decimal("0.012"), rollover_percent=Decimal("50"))
    with time_machine.travel(START, tick=False):
        contract = contract_activate(contract_id=contract.pk)
        charge(wallet, feature, "60000", "q1-burst")
    return contract


CONTRACT_MODELS = roles.CONTRACT_MODELS


@pytest.mark.parametrize(("role", "expected"), [("finance", 200), ("auditor", 200), ("sales_rep", None),
                                                ("support", 403)])
def test_contract_pages_follow_the_role(role, expected, active, staff_client):  # noqa: F811
    client = staff_client(role)
    for model in CONTRACT_MODELS:
        allowed = f"billing.view_{model}" in roles.role_permissions()[{
            "finance": roles.FINANCE, "auditor": roles.AUDITOR, "sales_rep": roles.SALES_REP,
            "support": roles.SUPPORT}[role]]
        status = expected or (200 if allowed else 403)
        if model == "contractpricetier":
            continue  # edited inline on its contract
        assert client.get(reverse(f"admin:billing_{model}_changelist")).status_code == status, model
    page = client.get(reverse("admin:billing_contract_change", args=[active.pk]))
    assert page.status_code == (expected or 200)
    if page.status_code == 200:
        body = page.content.decode()
        assert "Projected true-up amount" in body and "BIG-2026" in body
        assert ("Run true-up now" in body) == (role == "finance")  # its true-up dates have passed


def test_auditor_cannot_run_operations(active, staff_client):  # noqa: F811
    client = staff_client("auditor")
    for operation in ("activate", "cancel", "run_due", "true_up", "renew", "add_credits", "change_price"):
        assert client.get(reverse(f"admin:billing_contract_{operation}", args=[active.pk])).status_code == 403
    assert client.post(reverse("admin:billing_contract_change", args=[active.pk]), {}).status_code == 403


def test_finance_drafts_a_contract_with_tiers_and_activates_it(customer, wallet, staff_client):  # noqa: F811
    client = staff_client("finance")
    form = {
        "customer": customer.pk, "wallet": wallet.pk, "reference": "ADM-1", "starts_at_0": "2026-01-01",
        "starts_at_1": "00:00:00", "term_months": 12, "commitment": "credits", "committed_credits": "120000",
        "committed_spend": "0", "currency": "USD", "list_price": "0.01", "discount_percent": "0",
        "payment_schedule": "upfront", "true_up_cadence": "annual", "true_up_price": "", "rollover_percent": "20",
        "credit_limit": "",
        "tiers-TOTAL_FORMS": "1", "tiers-INITIAL_FORMS": "0", "tiers-MIN_NUM_FORMS": "0",
        "tiers-MAX_NUM_FORMS": "1000", "tiers-0-min_credits": "100000", "tiers-0-price_per_credit": "0.0095",
    }
    response = client.post(reverse("admin:billing_contract_add"), form)
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else response
    contract = Contract.objects.get(reference="ADM-1")
    assert contract.status == "draft" and contract.ends_at == at(2027, 1, 1)
    assert list(contract.tiers.values_list("min_credits", "price_per_credit")) == [
        (Decimal("100000"), Decimal("0.0095"))]
    assert AuditEvent.objects.filter(action="contract.admin_add", object_id=str(contract.pk)).exists()

    response = client.post(reverse("admin:billing_contract_activate", args=[contract.pk]), {})
    assert response.status_code == 302
    contract.refresh_from_db()
    assert contract.status == "active"
    first = contract.instalments.get()
    assert first.amount == Decimal("1140.00")  # 120,000 × 0.0095
    assert first.invoice.lines.get().kind == InvoiceLine.Kind.CONTRACT
    # Active: the terms are fixed, the change form no longer saves.
    assert client.post(reverse("admin:billing_contract_change", args=[contract.pk]), form).status_code == 403
    # A second live contract on the same wallet is a form error, not a database error.
    again = client.post(reverse("admin:billing_contract_add"), {**form, "reference": "ADM-2"})
    assert again.status_code == 200 and "already has a draft or active contract" in again.content.decode()
    assert not Contract.objects.filter(reference="ADM-2").exists()


def test_finance_runs_a_passed_true_up_renews_and_adds_credits(active, wallet, staff_client):  # noqa: F811
    client = staff_client("finance")
    with time_machine.travel(at(2026, 4, 2), tick=False):
        page = client.get(reverse("admin:billing_contract_change", args=[active.pk])).content.decode()
        assert "Run true-up now" in page
        assert client.post(reverse("admin:billing_contract_true_up", args=[active.pk]), {}).status_code == 302
        first = TrueUp.objects.filter(contract=active).order_by("period_end").first()
        assert first.settled_at is not None and first.overage_credits == Decimal("10000")
        assert first.amount == Decimal("120.00") and first.invoice.lines.get().kind == InvoiceLine.Kind.TRUE_UP

        assert client.get(reverse("admin:billing_contract_renew", args=[active.pk])).status_code == 200
        token = "tok-renew-0000000000001"
        for _ in range(2):  # a double submit renews once
            assert client.post(reverse("admin:billing_contract_renew", args=[active.pk]),
                               {"token": token, "months": "12"}).status_code == 302
        active.refresh_from_db()
        assert active.ends_at == at(2028, 1, 1)
        assert active.amendments.filter(kind=ContractAmendment.Kind.RENEWAL).count() == 1

        token = "tok-add-00000000000001"
        assert client.post(reverse("admin:billing_contract_add_credits", args=[active.pk]),
                           {"token": token, "credits": "1000", "note": "pilot"}).status_code == 302
    added = active.amendments.get(kind=ContractAmendment.Kind.ADD_CREDITS)
    assert added.grant.original_amount == Decimal("1000") and added.invoice.total == Decimal("8.10")
    assert_ledger_consistent(wallet)


def test_api_statement_detail_and_list(active, read_api, usage_api):  # noqa: F811
    with time_machine.travel(at(2026, 2, 1), tick=False):
        status, body = read_api.get(f"/api/v1/contracts/{active.pk}/statement")
    assert status == 200, body
    assert body["contract"] == active.pk and body["currency"] == "USD"
    assert body["committed"] == "50000.000000" and body["consumed"] == "60000.000000"
    assert body["outstanding_overage"] == "10000.000000"
    assert body["true_up_price"] == "0.0120000000"
    assert body["period_end"].startswith("2026-04-01")
    assert isinstance(body["projected_true_up_amount"], str)

    status, body = read_api.get(f"/api/v1/contracts/{active.pk}")
    assert status == 200 and body["status"] == "active" and len(body["instalments"]) == 4
    assert body["instalments"][0]["amount"] == "405.0000" and body["instalments"][0]["invoice"]
    assert body["instalments"][1]["invoice"] is None and len(body["true_ups"]) == 4

    status, body = read_api.get("/api/v1/contracts?customer=bigco")
    assert status == 200 and [c["id"] for c in body["results"]] == [active.pk]
    assert_error(read_api.get("/api/v1/contracts?customer=nobody"), 404, "not_found")
    assert_error(read_api.get("/api/v1/contracts?limit=0"), 400, "invalid_request", "limit")


def test_api_errors_are_in_the_envelope(customer, read_api):  # noqa: F811
    from tests.billing.api.conftest import Api

    assert_error(read_api.get("/api/v1/contracts/999999/statement"), 404, "not_found")
    draft = tiered_contract(customer)
    assert_error(read_api.get(f"/api/v1/contracts/{draft.pk}/statement"), 400, "invalid_request", "status")
    assert_error(Api(None).get(f"/api/v1/contracts/{draft.pk}/statement"), 401, "unauthorized")
    assert_error(make_api("usage:write").get(f"/api/v1/contracts/{draft.pk}/statement"), 403, "forbidden")


def test_the_beat_job_runs_due_steps_once_and_records_its_run(active, wallet):
    assert any(job.task == "billing.tasks.contracts_run_due" for job in SCHEDULE)
    with time_machine.travel(at(2026, 4, 1, 0, 15), tick=False):
        assert contracts_run_due() == 2  # the Q1 true-up, then the April instalment
        assert contracts_run_due() == 0
    run = JobRun.objects.filter(name="contracts_run_due").order_by("pk").first()
    assert run.status == "succeeded" and run.detail["steps"] == 2
    first = TrueUp.objects.filter(contract=active).order_by("period_end").first()
    assert first.overage_credits == Decimal("10000")
    april = active.instalments.get(index=1)
    assert april.grant.remaining == Decimal("50000")  # the true-up settled the overage, not April's credits
    assert_ledger_consistent(wallet)


def test_finance_cancels_a_draft_but_not_an_active_contract(customer, active, staff_client):  # noqa: F811
    client = staff_client("finance")
    assert client.post(reverse("admin:billing_contract_cancel", args=[active.pk]), {"reason": "typo"}).status_code \
        == 302
    active.refresh_from_db()
    assert active.status == "active"  # refused: active contracts run to their term end
    draft = tiered_contract(customer, wallet=Wallet.objects.create(customer=customer, name="Pilot", is_default=False))
    page = client.get(reverse("admin:billing_contract_change", args=[draft.pk])).content.decode()
    assert "Cancel draft" in page and "Available once the contract is active." in page
    assert client.post(reverse("admin:billing_contract_cancel", args=[draft.pk]), {"reason": "lost the deal"}) \
        .status_code == 302
    draft.refresh_from_db()
    assert draft.status == "canceled"
    assert AuditEvent.objects.filter(action="contract.cancel", object_id=str(draft.pk)).exists()
