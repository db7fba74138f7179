"""DESIGN.md §4 invariant 6 (and 4 under contention) with real threads against
the real PostgreSQL: each thread has its own connection, commits for real and
closes its connection at the end."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connections
from django.db.models import Sum
from django.utils import timezone

import billing.services.usage
from billing.errors import InsufficientCredits
from billing.models import CreditGrant, LedgerEntry, PackPurchase, Reservation, UsageEvent, Wallet
from billing.selectors import wallet_balance
from billing.services.grants import default_wallet, grant_create, grant_void, grants_expire_due
from billing.services.packs import pack_purchase
from billing.services.reservations import reservation_capture, reservation_create, reservation_release
from billing.services.usage import ChargeRequest, usage_charge, usage_charge_many
from tests.conftest import assert_ledger_consistent, assert_only_usable_grants_consumed
from tests.factories import CreditPackFactory, funded_wallet, grant, make_customer, make_feature

D = Decimal
pytestmark = pytest.mark.django_db(transaction=True)


def run_threads(count: int, target, timeout: float = 120) -> list:
    """Start ``count`` threads on a barrier, each running ``target(index)`` on its
    own database connection; return their results, re-raising the first error."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list = []

    def body(index):
        try:
            barrier.wait(timeout=30)
            results[index] = target(index)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck (deadlock?)"
    if errors:
        raise errors[0]
    return results


def request(wallet, feature, quantity, event_id):
    return ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature, quantity=D(quantity),
                         event_id=event_id)


def assert_block_wallet_never_below_zero(wallet):
    """Every running balance the ledger ever recorded is >= 0 (no holds involved)."""
    assert not LedgerEntry.objects.filter(wallet=wallet, balance_after__lt=0).exists()


@pytest.fixture(params=["database-function", "python-engine"])
def engine(request, monkeypatch):
    """Single events may be charged by the SQL fast path or the Python engine: prove both."""
    if request.param == "python-engine":
        monkeypatch.setattr(billing.services.usage, "FAST_PATH", False, raising=False)
    return request.param


def test_16_clients_drain_a_block_wallet_exactly(feature, engine):
    quarter = make_feature("quarter", "0.25")
    wallet = default_wallet(make_customer("hot"))
    grant(wallet, "40", kind="promotional", priority=10)
    grant(wallet, "35.5")
    grant(wallet, "24.5", expires_at=timezone.now() + timedelta(days=3))
    start = wallet_balance(Wallet.objects.get(pk=wallet.pk)).available
    assert start == D("100")

    def client(index):
        used = quarter if index % 4 == 0 else feature
        answers = []
        n = 0
        while True:
            n += 1
            result = usage_charge(request(wallet, used, "1", f"t{index}-{n}"))
            answers.append(result)
            if result.http_status == 402:
                return answers
            assert result.http_status == 201, result.body

    answers = [a for per_thread in run_threads(16, client) for a in per_thread]

    charged = [a for a in answers if a.status == "charged"]
    assert sum(a.credits for a in charged) == start
    assert all(D(a.body["balance"]["available"]) >= 0 for a in charged)
    assert all(a.status == "rejected" for a in answers if a.http_status == 402)
    events = UsageEvent.objects.filter(wallet=wallet, status=UsageEvent.Status.CHARGED)
    assert events.count() == len(charged) == len({a.event_id for a in charged})
    assert events.aggregate(t=Sum("credits"))["t"] == start
    per_event = Counter()
    for event_id, amount in LedgerEntry.objects.filter(wallet=wallet, type="usage").values_list(
            "usage_event__event_id", "amount"):
        per_event[event_id] -= amount
    assert per_event == {a.event_id: a.credits for a in charged}  # each event charged exactly once
    wallet = Wallet.objects.get(pk=wallet.pk)
    assert wallet.ledger_balance == 0 and wallet_balance(wallet).available == 0
    assert_block_wallet_never_below_zero(wallet)
    assert_ledger_consistent(wallet)
    assert_only_usable_grants_consumed(wallet)


@pytest.mark.parametrize("fits", [True, False])
def test_one_event_id_from_8_threads_is_one_charge_with_8_identical_answers(feature, fits, engine):
    wallet = funded_wallet("10")
    quantity = "3" if fits else "30"
    for round_ in range(3):
        answers = run_threads(8, lambda i, r=round_: usage_charge(request(wallet, feature, quantity, f"same-{r}")))
        assert len({(a.http_status, json.dumps(a.body, sort_keys=True)) for a in answers}) == 1, answers
        assert answers[0].http_status == (201 if fits else 402)
        assert sorted(a.status for a in answers).count("duplicate") == 7
        assert UsageEvent.objects.filter(customer=wallet.customer, event_id=f"same-{round_}").count() == 1
    wallet = Wallet.objects.get(pk=wallet.pk)
    assert wallet.ledger_balance == (D("1") if fits else D("10"))
    assert_ledger_consistent(wallet)


def test_concurrent_holds_and_charges_never_oversubscribe(feature):
    wallet = funded_wallet("100")
    outcomes = {"held": [], "refused_holds": 0}
    lock = threading.Lock()

    def client(index):
        rng = random.Random(index)
        for n in range(12):
            if index % 2 == 0:
                try:
                    hold = reservation_create(customer=wallet.customer, wallet_id=wallet.pk,
                                              amount=D(rng.choice(["3", "7.5", "11"])), ttl_seconds=600)
                except InsufficientCredits:
                    with lock:
                        outcomes["refused_holds"] += 1
                    continue
                with lock:
                    outcomes["held"].append(hold.pk)
                action = rng.choice(["capture-less", "capture-more", "release", "keep"])
                if action == "release":
                    reservation_release(reservation_id=hold.pk)
                elif action != "keep":
                    extra = D("2") if action == "capture-more" else D("-1")
                    reservation_capture(reservation=hold, event_id=f"cap-{index}-{n}", amount=hold.amount + extra)
            else:
                result = usage_charge(request(wallet, feature, rng.choice(["1", "2.5", "4"]), f"c-{index}-{n}"))
                assert result.http_status in (201, 402)
                if result.http_status == 201:
                    assert D(result.body["balance"]["available"]) >= 0

    run_threads(10, client)

    wallet = Wallet.objects.get(pk=wallet.pk)
    balance = wallet_balance(wallet)
    open_holds = Reservation.objects.filter(wallet=wallet, status="open").aggregate(t=Sum("amount"))["t"] or 0
    assert balance.held == open_holds
    assert balance.available == wallet.ledger_balance - open_holds >= 0
    charged = UsageEvent.objects.filter(wallet=wallet, status="charged").aggregate(t=Sum("credits"))["t"] or 0
    assert charged + wallet.ledger_balance == D("100")
    captured = Reservation.objects.filter(wallet=wallet, status="captured")
    assert all(r.usage_event is not None and r.usage_event.status == "charged" for r in captured)
    assert outcomes["held"]
    assert_block_wallet_never_below_zero(wallet)
    assert_ledger_consistent(wallet)


def test_void_and_expiry_racing_charges_stay_consistent(feature):
    now = timezone.now()
    wallet = default_wallet(make_customer("racy"))
    expiring = [grant(wallet, "20", priority=0, expires_at=now + timedelta(seconds=30)) for _ in range(3)]
    voidable = [grant(wallet, "20", priority=10) for _ in range(3)]
    grant(wallet, "40", kind="promotional")
    later = now + timedelta(minutes=1)
    job_counts = []

    def worker(index):
        if index == 0:
            job_counts.append(grants_expire_due(now=later))
        elif index == 1:
            for g in voidable:
                grant_void(grant_id=g.pk, reason="race")
        else:
            for n in range(15):
                at = now if n % 2 else later
                result = usage_charge(request(wallet, feature, "1.5", f"{index}-{n}"), now=at)
                assert result.http_status in (201, 402)

    run_threads(8, worker)
    job_counts.append(grants_expire_due(now=later))

    wallet = Wallet.objects.get(pk=wallet.pk)
    assert_ledger_consistent(wallet)
    assert_only_usable_grants_consumed(wallet)
    assert_block_wallet_never_below_zero(wallet)
    for g in expiring:
        g.refresh_from_db()
        assert g.status in ("expired", "depleted") and g.remaining == 0
        assert not LedgerEntry.objects.filter(grant=g, type="usage", usage_event__created_at__gte=g.expires_at).exists()
    for g in voidable:
        g.refresh_from_db()
        assert g.status == "voided" and g.remaining == 0
    assert CreditGrant.objects.filter(wallet=wallet, status="expired").count() == sum(job_counts)
    totals = dict(LedgerEntry.objects.filter(wallet=wallet).values_list("type").annotate(t=Sum("amount")))
    assert totals["grant"] == D("160")
    assert sum(totals.values()) == wallet.ledger_balance


def test_overlapping_batches_do_not_deadlock_and_charge_each_event_once(feature):
    wallets = [funded_wallet("1000") for _ in range(4)]
    for wallet in wallets:
        grant(wallet, "50", kind="promotional", priority=0)

    def batcher(index):
        rng = random.Random(index)
        results = []
        for round_ in range(4):
            order = wallets[:] if index % 2 else wallets[::-1]
            batch = [request(rng.choice(order), feature, "1", f"b{index}-{round_}-{k}") for k in range(60)]
            batch.sort(key=lambda r: order.index(next(w for w in wallets if w.pk == r.wallet_id)))
            results.extend(usage_charge_many(batch))
        return results

    results = [r for per_thread in run_threads(8, batcher) for r in per_thread]
    assert {r.status for r in results} == {"charged"}
    assert len(results) == 8 * 4 * 60
    total = D(0)
    for wallet in wallets:
        wallet = Wallet.objects.get(pk=wallet.pk)
        total += D("1050") - wallet.ledger_balance
        assert_ledger_consistent(wallet)
    assert total == len(results)


def test_same_grant_idempotency_key_from_8_threads_grants_once():
    wallet = default_wallet(make_customer("idem"))
    grants = run_threads(8, lambda i: grant_create(wallet=wallet, kind="promotional", amount=D("25"),
                                                   idempotency_key="promo-2026"))
    assert len({g.pk for g in grants}) == 1
    assert CreditGrant.objects.filter(wallet=wallet).count() == 1
    assert Wallet.objects.get(pk=wallet.pk).ledger_balance == D("25")
    assert_ledger_consistent(wallet)


def test_same_pack_purchase_key_from_8_threads_sells_once():
    pack = CreditPackFactory(code="starter", credits=D("500"), price=D("50.00"))
    wallet = default_wallet(make_customer("buyer"))
    purchases = run_threads(8, lambda i: pack_purchase(wallet=wallet, pack=pack, idempotency_key="order-77"))
    assert len({p.pk for p in purchases}) == 1
    assert PackPurchase.objects.count() == 1
    assert CreditGrant.objects.filter(wallet=wallet).count() == 1
    assert Wallet.objects.get(pk=wallet.pk).ledger_balance == D("500")
    assert_ledger_consistent(wallet)
