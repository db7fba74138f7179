"""DESIGN.md §4 invariants 1–5 and 8 at the service level (6 lives in
test_concurrency.py, the randomized check in test_ledger_stateful.py)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

import billing.events
from billing.models import CreditGrant, LedgerEntry, OutboxEvent, Reservation, UsageEvent, Wallet
from billing.selectors import wallet_balance
from billing.services.grants import (
    adjustment_approve,
    adjustment_request,
    default_wallet,
    grant_expire,
    grant_void,
    grants_expire_due,
)
from billing.services.reservations import (
    reservation_capture,
    reservation_create,
    reservation_release,
    reservations_expire_due,
)
from billing.services.usage import ChargeRequest, usage_charge, usage_charge_many
from tests.billing.test_grants import approver
from tests.conftest import assert_ledger_consistent, assert_only_usable_grants_consumed
from tests.factories import funded_wallet, grant, make_customer, make_feature

D = Decimal


def request(wallet, feature, quantity, event_id, **kwargs):
    return ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature, quantity=D(quantity),
                         event_id=event_id, **kwargs)


def charge(wallet, feature, quantity, event_id, *, now=None, **kwargs):
    return usage_charge(request(wallet, feature, quantity, event_id, **kwargs), now=now)


def fresh(wallet):
    return Wallet.objects.get(pk=wallet.pk)


# --- invariants 1 and 2 after every operation ----------------------------------------------------


@pytest.mark.django_db
def test_ledger_consistent_after_every_kind_of_operation(feature):
    now = timezone.now()
    other = make_feature("other", "2.5")
    wallet = default_wallet(make_customer())
    steps = [
        lambda: grant(wallet, "100", expires_at=now + timedelta(days=1)),
        lambda: grant(wallet, "20", kind="promotional", priority=10),
        lambda: grant(wallet, "30", kind="promotional", feature=other),
        lambda: charge(wallet, feature, "25.123456", "c1"),
        lambda: charge(wallet, other, "3", "c2"),
        lambda: charge(wallet, feature, "1000", "too-big"),
        lambda: usage_charge_many([request(wallet, feature, "1", f"b{i}") for i in range(5)]),
        lambda: reservation_capture(reservation=reservation_create(customer=wallet.customer, wallet_id=wallet.pk,
                                                                   amount=D("10")), event_id="cap", amount=D("4")),
        lambda: reservation_release(reservation_id=reservation_create(customer=wallet.customer,
                                                                      wallet_id=wallet.pk, amount=D("5")).pk),
        lambda: grant_void(grant_id=CreditGrant.objects.get(wallet=wallet, feature=other).pk),
        lambda: adjustment_approve(adjustment_id=adjustment_request(
            wallet=wallet, amount=D("-1.5"), reason="fix", requested_by=approver("m")).pk, user=approver("c")),
        lambda: adjustment_approve(adjustment_id=adjustment_request(
            wallet=wallet, amount=D("7"), reason="gift", requested_by=approver("m2")).pk, user=approver("c2")),
        lambda: grants_expire_due(now=now + timedelta(days=2)),
        lambda: charge(wallet, feature, "1", "after-expiry", now=now + timedelta(days=2)),
    ]
    for step in steps:
        step()
        assert_ledger_consistent(wallet)
        assert_only_usable_grants_consumed(wallet)
    assert set(LedgerEntry.objects.filter(wallet=wallet).values_list("type", flat=True)) >= {
        "grant", "usage", "void", "adjustment", "expiry"}


@pytest.mark.django_db
def test_overdraft_writes_overage_enforces_the_limit_and_next_grant_repays_first(feature):
    wallet = funded_wallet("4", policy=Wallet.Policy.OVERDRAFT, credit_limit="10")
    assert wallet_balance(wallet).available == D("14")

    spill = charge(wallet, feature, "6", "spill")
    assert spill.http_status == 201
    assert spill.body["allocations"][-1] == {"grant": None, "amount": "2.000000", "overage": True}
    overage_entry = LedgerEntry.objects.get(wallet=wallet, type=LedgerEntry.Type.OVERAGE)
    assert (overage_entry.grant, overage_entry.amount) == (None, D("-2"))
    wallet = fresh(wallet)
    assert (wallet.overage, wallet.ledger_balance, wallet_balance(wallet).available) == (D("2"), D("-2"), D("8"))
    assert_ledger_consistent(wallet)

    beyond = charge(wallet, feature, "8.000001", "beyond")
    assert beyond.http_status == 402
    assert beyond.body["error"]["code"] == "insufficient_credits"
    assert D(beyond.body["error"]["details"]["available"]) == D("8")
    assert fresh(wallet).overage == D("2")
    assert charge(wallet, feature, "8", "to-the-limit").http_status == 201
    wallet = fresh(wallet)
    assert (wallet.overage, wallet_balance(wallet).available) == (D("10"), 0)
    assert charge(wallet, feature, "0.000001", "one-more").http_status == 402
    assert_ledger_consistent(wallet)

    top_up = grant(wallet, "15", kind="promotional")
    top_up.refresh_from_db()
    wallet = fresh(wallet)
    assert (top_up.remaining, wallet.overage, wallet.ledger_balance) == (D("5"), 0, D("5"))
    settled = LedgerEntry.objects.filter(wallet=wallet, type=LedgerEntry.Type.OVERAGE_SETTLED).order_by("sequence")
    assert [(e.grant_id, e.amount) for e in settled] == [(top_up.pk, D("-10")), (None, D("10"))]
    assert wallet_balance(wallet).available == D("15")
    assert_ledger_consistent(wallet)
    assert_only_usable_grants_consumed(wallet)


@pytest.mark.django_db
def test_small_grant_repays_part_of_the_overage(feature):
    wallet = funded_wallet("0", policy=Wallet.Policy.OVERDRAFT, credit_limit="10")
    charge(wallet, feature, "7", "debt")
    small = grant(wallet, "3", kind="promotional")
    small.refresh_from_db()
    wallet = fresh(wallet)
    assert (small.remaining, small.status, wallet.overage) == (0, CreditGrant.Status.DEPLETED, D("4"))
    assert wallet_balance(wallet).available == D("6")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_grant_not_usable_for_every_feature_now_does_not_repay_overage(feature):
    """A feature-scoped grant may pay only for its feature, and a grant taking
    effect tomorrow cannot pay today: neither settles earlier overage."""
    wallet = funded_wallet("0", policy=Wallet.Policy.OVERDRAFT, credit_limit="10")
    charge(wallet, feature, "5", "debt")
    scoped = grant(wallet, "20", kind="promotional", feature=make_feature("images", "1"))
    future = grant(wallet, "20", effective_at=timezone.now() + timedelta(days=1))
    for g in (scoped, future):
        g.refresh_from_db()
        assert g.remaining == D("20")
    assert fresh(wallet).overage == D("5")
    assert_ledger_consistent(wallet)
    assert_only_usable_grants_consumed(wallet)


# --- invariant 3 ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_invariant_3_holds_across_expiry_effective_dates_and_scopes(feature):
    now = timezone.now()
    scoped_feature = make_feature("images", "1")
    wallet = default_wallet(make_customer())
    grant(wallet, "5", priority=0, effective_at=now - timedelta(days=2), expires_at=now - timedelta(hours=1))
    grant(wallet, "5", priority=0, effective_at=now + timedelta(hours=1))
    grant(wallet, "5", priority=0, kind="promotional", feature=scoped_feature)
    grant(wallet, "5", priority=0, kind="promotional", effective_at=now - timedelta(hours=2),
          expires_at=now + timedelta(hours=2))
    grant(wallet, "50", effective_at=now - timedelta(hours=3))
    for i, at in enumerate([now, now + timedelta(minutes=30), now + timedelta(hours=1, minutes=1),
                            now + timedelta(hours=3)]):
        assert charge(wallet, feature, "3", f"e{i}", now=at).http_status == 201
    # A check that can fail: this verifies the helper itself flags a lapsed grant's consumption.
    assert_only_usable_grants_consumed(wallet)
    consumed = set(LedgerEntry.objects.filter(wallet=wallet, type="usage").values_list("grant__priority",
                                                                                      "grant__feature"))
    assert (0, scoped_feature.pk) not in consumed


# --- invariant 4: idempotency --------------------------------------------------------------------


@pytest.mark.django_db
def test_usage_replay_returns_first_answer_and_charges_once(feature):
    wallet = funded_wallet("10")
    first = charge(wallet, feature, "3", "evt-1", properties={"team": "a"})
    charge(wallet, feature, "2", "evt-2")
    replay = charge(wallet, feature, "3", "evt-1", properties={"team": "a"})
    assert (replay.http_status, replay.body) == (201, first.body)
    assert replay.status == "duplicate"
    assert UsageEvent.objects.filter(customer=wallet.customer, event_id="evt-1").count() == 1
    assert fresh(wallet).ledger_balance == D("5")
    assert LedgerEntry.objects.filter(wallet=wallet, type="usage").count() == 2
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_rejected_event_replays_its_rejection_even_after_a_top_up(feature):
    wallet = funded_wallet("1")
    first = charge(wallet, feature, "3", "evt")
    grant(wallet, "10")
    replay = charge(wallet, feature, "3", "evt")
    assert (replay.http_status, replay.body) == (402, first.body)
    assert fresh(wallet).ledger_balance == D("11")


@pytest.mark.django_db
@pytest.mark.parametrize("change", [
    {"quantity": "4"}, {"properties": {"team": "b"}}, {"feature": "other"},
    {"occurred_at": "earlier"},
])
def test_usage_same_event_id_different_payload_is_a_conflict(feature, change):
    other = make_feature("other", "1")
    wallet = funded_wallet("10")
    at = timezone.now() - timedelta(minutes=5)
    charge(wallet, feature, "3", "evt", properties={"team": "a"}, occurred_at=at)
    kwargs = {"properties": {"team": "a"}, "occurred_at": at}
    quantity, used = "3", feature
    if "quantity" in change:
        quantity = change["quantity"]
    elif "properties" in change:
        kwargs["properties"] = change["properties"]
    elif "feature" in change:
        used = other
    else:
        kwargs["occurred_at"] = at - timedelta(seconds=1)
    result = charge(wallet, used, quantity, "evt", **kwargs)
    assert result.http_status == 409
    assert result.body["error"]["code"] == "idempotency_conflict"
    assert fresh(wallet).ledger_balance == D("7")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_batch_replays_and_in_batch_duplicates(feature):
    wallet = funded_wallet("10")
    batch = [request(wallet, feature, "1", "a"), request(wallet, feature, "1", "b"),
             request(wallet, feature, "1", "a"), request(wallet, feature, "2", "b")]
    results = usage_charge_many(batch)
    assert [r.status for r in results] == ["charged", "charged", "duplicate", "conflict"]
    assert results[2].body == results[0].body
    again = usage_charge_many([request(wallet, feature, "1", "a"), request(wallet, feature, "1", "b")])
    assert [r.status for r in again] == ["duplicate", "duplicate"]
    assert [r.body for r in again] == [results[0].body, results[1].body]
    assert fresh(wallet).ledger_balance == D("8")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_same_event_id_for_two_customers_is_two_events(feature):
    one, two = funded_wallet("5"), funded_wallet("5")
    assert charge(one, feature, "1", "shared").status == "charged"
    assert charge(two, feature, "1", "shared").status == "charged"


# --- invariant 5: the database refuses edits -----------------------------------------------------


def _refused(action):
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        action()


@pytest.mark.django_db
@pytest.mark.parametrize("sql", [
    "UPDATE billing_ledgerentry SET amount = 1000 WHERE id = %s",
    "UPDATE billing_ledgerentry SET memo = 'edited' WHERE id = %s",
    "DELETE FROM billing_ledgerentry WHERE id = %s",
])
def test_raw_sql_cannot_change_ledger_rows(feature, sql):
    wallet = funded_wallet("5")
    entry = LedgerEntry.objects.get(wallet=wallet)

    def run():
        with connection.cursor() as cursor:
            cursor.execute(sql, [entry.pk] if "%s" in sql else None)

    _refused(run)
    assert LedgerEntry.objects.get(pk=entry.pk).amount == D("5")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("sql", ["TRUNCATE billing_ledgerentry", "TRUNCATE billing_ledgerentry CASCADE"])
def test_truncate_of_the_ledger_is_refused(feature, sql):
    # Committed rows: a TRUNCATE in the transaction that inserted them fails for another reason.
    wallet = funded_wallet("5")

    def run():
        with connection.cursor() as cursor:
            cursor.execute(sql)

    _refused(run)
    assert LedgerEntry.objects.filter(wallet=wallet).count() == 1
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_orm_cannot_change_ledger_rows(feature):
    wallet = funded_wallet("5")
    charge(wallet, feature, "2", "e")
    entry = LedgerEntry.objects.filter(wallet=wallet).first()
    _refused(lambda: LedgerEntry.objects.filter(pk=entry.pk).update(amount=D("99")))
    _refused(lambda: LedgerEntry.objects.filter(wallet=wallet).delete())
    _refused(lambda: LedgerEntry.objects.all().delete())
    entry.memo = "edited"
    _refused(entry.save)
    _refused(entry.delete)
    assert LedgerEntry.objects.filter(wallet=wallet).count() == 2
    assert not LedgerEntry.objects.filter(memo="edited").exists()
    assert_ledger_consistent(wallet)


# --- invariant 8: clock-driven jobs are idempotent -----------------------------------------------


def _expiry_fixture(feature, now):
    """Wallets with grants in every state the expiry job meets."""
    wallets = []
    for n in range(3):
        wallet = default_wallet(make_customer(f"exp-{n}"))
        past = dict(effective_at=now - timedelta(days=10))
        grant(wallet, "10", expires_at=now - timedelta(days=1), **past)                      # due, untouched
        used = grant(wallet, "10", priority=0, expires_at=now + timedelta(hours=1), **past)  # due at `later`
        grant(wallet, "10", kind="promotional", expires_at=now - timedelta(hours=1), **past)
        grant(wallet, "10", expires_at=now + timedelta(days=30), **past)                     # not due
        grant(wallet, "5")                                                                   # never expires
        voided = grant(wallet, "3", expires_at=now - timedelta(hours=2), **past)
        grant_void(grant_id=voided.pk)
        charge(wallet, feature, "4", f"use-{n}", now=now)
        assert CreditGrant.objects.get(pk=used.pk).remaining == D("6")
        wallets.append(wallet)
    return wallets


def _ledger_state(wallets):
    return {
        "grants": sorted(CreditGrant.objects.filter(wallet__in=wallets).values_list("pk", "status", "remaining")),
        "entries": sorted(LedgerEntry.objects.filter(wallet__in=wallets).values_list(
            "wallet_id", "sequence", "type", "grant_id", "amount", "balance_after")),
        "wallets": sorted(Wallet.objects.filter(pk__in=[w.pk for w in wallets]).values_list(
            "pk", "ledger_balance", "last_sequence", "overage")),
        "expired_events": sorted(p["grant"] for p in OutboxEvent.objects.filter(topic="grant.expired")
                                 .values_list("payload", flat=True)),
    }


@pytest.mark.django_db
def test_grants_expire_due_twice_is_once(feature):
    now = timezone.now()
    wallets = _expiry_fixture(feature, now)
    later = now + timedelta(hours=2)
    assert grants_expire_due(now=later) == 3 * 3
    once = _ledger_state(wallets)
    assert grants_expire_due(now=later) == 0
    assert _ledger_state(wallets) == once
    for wallet in wallets:
        assert_ledger_consistent(wallet)
        balance = wallet_balance(fresh(wallet), at=later)
        assert (balance.available, balance.ledger_balance) == (D("15"), D("15"))
        expiries = LedgerEntry.objects.filter(wallet=wallet, type=LedgerEntry.Type.EXPIRY)
        assert sorted(e.amount for e in expiries) == [D("-10"), D("-10"), D("-6")]


@pytest.mark.django_db
def test_grants_expire_due_killed_midway_then_rerun_equals_one_clean_run(feature, monkeypatch):
    now = timezone.now()
    later = now + timedelta(hours=2)
    wallets = _expiry_fixture(feature, now)

    clean_point = transaction.savepoint()
    assert grants_expire_due(now=later) == 9
    clean = _ledger_state(wallets)
    transaction.savepoint_rollback(clean_point)
    assert not LedgerEntry.objects.filter(type=LedgerEntry.Type.EXPIRY).exists()

    published = billing.events.publish
    calls = {"n": 0}

    def dies_on_the_fifth_expiry(topic, payload):
        if topic == "grant.expired":
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt("worker killed")
        return published(topic, payload)

    monkeypatch.setattr(billing.events, "publish", dies_on_the_fifth_expiry)
    with pytest.raises(KeyboardInterrupt):
        grants_expire_due(now=later, batch_size=2)
    assert LedgerEntry.objects.filter(type=LedgerEntry.Type.EXPIRY).count() == 4
    monkeypatch.setattr(billing.events, "publish", published)

    assert grants_expire_due(now=later) == 5
    assert _ledger_state(wallets) == clean
    for wallet in wallets:
        assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_grant_expire_before_its_time_or_twice_does_nothing(feature):
    now = timezone.now()
    wallet = default_wallet(make_customer())
    g = grant(wallet, "10", expires_at=now + timedelta(days=1))
    assert grant_expire(grant_id=g.pk, now=now) is False
    assert grant_expire(grant_id=g.pk, now=now + timedelta(days=1)) is True
    assert grant_expire(grant_id=g.pk, now=now + timedelta(days=1)) is False
    assert LedgerEntry.objects.filter(grant=g, type="expiry").count() == 1
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_reservations_expire_due_twice_is_once(feature):
    wallet = funded_wallet("100")
    now = timezone.now()
    holds = [reservation_create(customer=wallet.customer, wallet_id=wallet.pk, amount=D("10"), ttl_seconds=ttl,
                                now=now) for ttl in (60, 120, 3600)]
    released = reservation_create(customer=wallet.customer, wallet_id=wallet.pk, amount=D("1"), ttl_seconds=60,
                                  now=now)
    reservation_release(reservation_id=released.pk, now=now)
    at = now + timedelta(seconds=600)
    assert reservations_expire_due(now=at) == 2
    once = sorted(Reservation.objects.values_list("pk", "status", "closed_at"))
    assert reservations_expire_due(now=at) == 0
    assert reservations_expire_due(now=at + timedelta(seconds=1)) == 0
    assert sorted(Reservation.objects.values_list("pk", "status", "closed_at")) == once
    statuses = dict(Reservation.objects.values_list("pk", "status"))
    assert [statuses[h.pk] for h in holds] == ["expired", "expired", "open"]
    assert statuses[released.pk] == "released"
    assert wallet_balance(fresh(wallet), at=at).available == D("90")
    assert_ledger_consistent(wallet)
