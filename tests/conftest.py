import importlib
from decimal import Decimal

import pytest
from django.apps import apps as django_apps
from django.db.backends.postgresql.operations import DatabaseOperations

from billing.models import CreditGrant, LedgerEntry, Wallet
from tests.factories import make_feature

_TRUNCATE_GUARD = "billing_ledgerentry_no_truncate"


@pytest.fixture(scope="session", autouse=True)
def _ledger_flushable_between_transactional_tests():
    """The ledger refuses TRUNCATE (DESIGN.md §4.5), and Django empties the
    database after each ``transaction=True`` test with one TRUNCATE. Lift the
    guard for that statement only, inside the flush's own transaction (table
    owner rights suffice; the guard is back before the transaction commits).
    The flush also wipes rows that data migrations created (the built-in
    ``credits`` feature): put them back so later tests see a migrated database."""
    original = DatabaseOperations.execute_sql_flush
    builtin_credits = importlib.import_module("billing.migrations.0003_credits_feature").create

    def execute_sql_flush(self, sql_list):
        if not any("billing_ledgerentry" in sql for sql in sql_list):
            return original(self, sql_list)
        original(self, [
            f"ALTER TABLE billing_ledgerentry DISABLE TRIGGER {_TRUNCATE_GUARD}",
            *sql_list,
            f"ALTER TABLE billing_ledgerentry ENABLE TRIGGER {_TRUNCATE_GUARD}",
        ])
        builtin_credits(django_apps, None)

    DatabaseOperations.execute_sql_flush = execute_sql_flush
    yield
    DatabaseOperations.execute_sql_flush = original


@pytest.fixture
def feature(db):
    return make_feature("api-call", "1")


def assert_ledger_consistent(wallet: Wallet) -> None:
    """DESIGN.md §4 invariants 1 and 2 for one wallet, straight from the database:
    entries sum to grants' remaining − overage = the stored ledger balance; every
    grant's entries sum to its remaining, within 0..original; sequences run
    1..n without gaps and each ``balance_after`` is the running total."""
    wallet.refresh_from_db()
    rows = list(LedgerEntry.objects.filter(wallet=wallet).order_by("sequence").values_list(
        "sequence", "amount", "balance_after", "grant_id"))
    entries_total = sum((amount for _, amount, _, _ in rows), Decimal(0))
    grants = list(CreditGrant.objects.filter(wallet=wallet))
    remaining = sum((g.remaining for g in grants), Decimal(0))
    assert entries_total == remaining - wallet.overage == wallet.ledger_balance
    assert wallet.overage >= 0
    unassigned = sum((amount for _, amount, _, grant_id in rows if grant_id is None), Decimal(0))
    assert -unassigned == wallet.overage
    moved: dict[int, Decimal] = {}
    for _, amount, _, grant_id in rows:
        if grant_id is not None:
            moved[grant_id] = moved.get(grant_id, Decimal(0)) + amount
    assert set(moved) <= {g.pk for g in grants}, "an entry of this wallet moves another wallet's grant"
    for grant in grants:
        assert moved.get(grant.pk, Decimal(0)) == grant.remaining, grant
        assert 0 <= grant.remaining <= grant.original_amount
        if grant.status in (CreditGrant.Status.PENDING_APPROVAL, CreditGrant.Status.REJECTED):
            assert grant.remaining == 0 and grant.pk not in moved, grant
    assert [seq for seq, _, _, _ in rows] == list(range(1, len(rows) + 1))
    running = Decimal(0)
    for seq, amount, balance_after, _ in rows:
        running += amount
        assert balance_after == running, f"entry #{seq}: balance_after {balance_after} != running {running}"
    assert wallet.last_sequence == len(rows)


def assert_only_usable_grants_consumed(wallet: Wallet) -> None:
    """DESIGN.md §4 invariant 3: every usage entry took credits from a grant that
    was usable when the charge ran (active then, effective, unexpired, in scope),
    and every overage repayment from a grant usable for any feature then.
    The moment of a charge is its usage event's ``created_at`` (the ``now`` it ran at)."""
    ended_at: dict[int, int] = {}
    for grant_id, sequence in LedgerEntry.objects.filter(
            wallet=wallet, type__in=[LedgerEntry.Type.EXPIRY, LedgerEntry.Type.VOID]).values_list("grant_id",
                                                                                               "sequence"):
        ended_at[grant_id] = min(sequence, ended_at.get(grant_id, sequence))
    entries = LedgerEntry.objects.filter(wallet=wallet, type=LedgerEntry.Type.USAGE).select_related(
        "grant", "usage_event")
    for entry in entries:
        grant, event = entry.grant, entry.usage_event
        assert grant is not None and event is not None, entry
        at = event.created_at
        assert grant.effective_at <= at, f"{entry}: grant #{grant.pk} not yet effective at {at}"
        assert grant.expires_at is None or grant.expires_at > at, f"{entry}: grant #{grant.pk} expired at {at}"
        assert grant.feature_id in (None, event.feature_id), f"{entry}: grant #{grant.pk} scoped elsewhere"
        assert grant.status in (CreditGrant.Status.ACTIVE, CreditGrant.Status.DEPLETED,
                                CreditGrant.Status.EXPIRED, CreditGrant.Status.VOIDED), entry
        assert ended_at.get(grant.pk, entry.sequence + 1) > entry.sequence, (
            f"{entry}: grant #{grant.pk} was already expired or voided")
        approved_later = grant.decided_at is not None and grant.decided_at > entry.created_at
        assert not approved_later, f"{entry}: grant #{grant.pk} approved after it was consumed"
    # A new grant repays overage only with credits usable for any feature at that moment.
    settled = LedgerEntry.objects.filter(wallet=wallet, type=LedgerEntry.Type.OVERAGE_SETTLED,
                                         grant__isnull=False).select_related("grant")
    for entry in settled:
        grant = entry.grant
        assert grant.feature_id is None, f"{entry}: feature-scoped grant #{grant.pk} repaid overage"
        assert grant.effective_at <= entry.created_at, f"{entry}: grant #{grant.pk} not yet effective"
        assert grant.expires_at is None or grant.expires_at > entry.created_at, f"{entry}: grant expired"


@pytest.fixture
def ledger_consistent():
    return assert_ledger_consistent
