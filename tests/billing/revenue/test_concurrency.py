"""Refund approvals racing each other with real threads on the real database:
never more refunded than was unused, credit-note numbers without gaps or
duplicates."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.errors import Conflict
from billing.models import CreditGrant, CreditNote, RefundRequest
from billing.services.grants import default_wallet
from billing.services.packs import pack_purchase
from billing.services.refunds import refund_approve, refund_request
from tests.billing.test_concurrency import run_threads
from tests.conftest import assert_ledger_consistent
from tests.factories import make_customer

pytestmark = pytest.mark.django_db(transaction=True)


def test_racing_approvals_never_refund_more_than_is_unused(pack, support, finance):
    wallet = default_wallet(make_customer("racer"))
    purchase = pack_purchase(wallet=wallet, pack=pack)
    requests = [refund_request(grant_id=purchase.grant_id, credits=Decimal("400"), reason=f"r{i}",
                               requested_by=support).pk for i in range(4)]

    def approve(index):
        try:
            return refund_approve(refund_id=requests[index], user=finance).status
        except Conflict as refused:
            return refused.code

    outcomes = run_threads(4, approve)
    assert sorted(outcomes) == ["over_refund", "over_refund", "refunded", "refunded"]
    grant = CreditGrant.objects.get(pk=purchase.grant_id)
    assert grant.remaining == Decimal("200")
    assert RefundRequest.objects.filter(status="pending_approval").count() == 2
    assert_ledger_consistent(wallet)


def test_concurrent_credit_notes_are_numbered_without_gaps(pack, support, finance):
    grants = []
    for i in range(6):
        wallet = default_wallet(make_customer(f"numbered-{i}"))
        grants.append(pack_purchase(wallet=wallet, pack=pack).grant_id)
    requests = [refund_request(grant_id=g, credits=Decimal("1"), reason="x", requested_by=support).pk
                for g in grants]
    run_threads(6, lambda index: refund_approve(refund_id=requests[index], user=finance))
    assert sorted(CreditNote.objects.values_list("sequence", flat=True)) == [1, 2, 3, 4, 5, 6]
