from decimal import Decimal

import pytest
from django.db.models import Sum

from billing.models import CreditGrant, LedgerEntry, Wallet
from tests.factories import make_feature


@pytest.fixture
def feature(db):
    return make_feature("api-call", "1")


def assert_ledger_consistent(wallet: Wallet) -> None:
    """DESIGN.md §4 invariants 1 and 2 for one wallet, straight from the database."""
    wallet.refresh_from_db()
    entries_total = LedgerEntry.objects.filter(wallet=wallet).aggregate(t=Sum("amount"))["t"] or Decimal(0)
    remaining = CreditGrant.objects.filter(wallet=wallet).aggregate(t=Sum("remaining"))["t"] or Decimal(0)
    assert entries_total == remaining - wallet.overage == wallet.ledger_balance
    unassigned = LedgerEntry.objects.filter(wallet=wallet, grant__isnull=True).aggregate(t=Sum("amount"))["t"]
    assert -(unassigned or Decimal(0)) == wallet.overage
    for grant in CreditGrant.objects.filter(wallet=wallet):
        moved = LedgerEntry.objects.filter(grant=grant).aggregate(t=Sum("amount"))["t"] or Decimal(0)
        assert moved == grant.remaining, grant
        assert 0 <= grant.remaining <= grant.original_amount
    sequences = list(LedgerEntry.objects.filter(wallet=wallet).order_by("sequence").values_list("sequence", flat=True))
    assert sequences == list(range(1, len(sequences) + 1))


@pytest.fixture
def ledger_consistent():
    return assert_ledger_consistent
