"""The single-event fast path (``creditdesk_usage_charge``, migration 0005) must be
indistinguishable from the Python engine: same answers, same rows, same hook calls.

The differential test builds random wallets (block and overdraft, paused, with
alert marks, holds, expired / future / feature-scoped grants, customer rate
overrides) and replays random event streams (duplicates, conflicts, zero and
huge quantities, features without a cost) through both engines from the same
database state, then compares everything a client or an accountant could see.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections import Counter
from datetime import UTC, timedelta
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st

from billing import events
from billing.models import (
    CreditGrant,
    Customer,
    Feature,
    FeatureCost,
    LedgerEntry,
    Reservation,
    UsageEvent,
    Wallet,
)
from billing.services import usage
from billing.services.grants import default_wallet
from billing.services.reservations import reservation_create
from billing.services.usage import ChargeRequest, usage_charge, usage_charge_many
from tests.billing import reference_usage
from tests.conftest import assert_ledger_consistent
from tests.factories import funded_wallet, grant, make_customer, make_feature

RATES = ["1", "0.5", "2.25", "0.0000001", "3.3333333333", "0.0000015"]
QUANTITIES = ["1", "0", "2.5", "0.000001", "0.4", "7", "13.333333", "100", "1000000", "12345678901234.123456"]


def _build_world(rng: random.Random, index: str, now):
    feature = make_feature(f"hp-main-{index}", rng.choice(RATES))
    other = make_feature(f"hp-other-{index}", rng.choice(RATES))
    # A feature whose only cost starts in the future: no cost effective now.
    unpriced = make_feature(f"hp-unpriced-{index}", "1", effective_from=now + timedelta(days=3))
    policy = rng.choice([Wallet.Policy.BLOCK, Wallet.Policy.BLOCK, Wallet.Policy.OVERDRAFT])
    customer = make_customer(f"hp-{index}", policy=policy, credit_limit=Decimal(rng.choice(["0", "5", "40.5"])))
    wallet = default_wallet(customer)
    if rng.random() < 0.3:
        FeatureCost.objects.create(feature=feature, customer=customer, credits_per_unit=Decimal(rng.choice(RATES)),
                                   effective_from=now - timedelta(days=2))
    if rng.random() < 0.3:
        FeatureCost.objects.create(feature=feature, credits_per_unit=Decimal(rng.choice(RATES)),
                                   effective_from=now - timedelta(hours=1))
    for _ in range(rng.randrange(0, 5)):
        kwargs = {"priority": rng.choice([10, 50, 50, 90])}
        shape = rng.random()
        if shape < 0.15:
            kwargs.update(effective_at=now - timedelta(days=10), expires_at=now - timedelta(days=1))  # expired
        elif shape < 0.25:
            kwargs.update(effective_at=now + timedelta(days=1))  # not yet effective
        elif shape < 0.5:
            kwargs.update(expires_at=now + timedelta(days=rng.randrange(1, 90)))
        if rng.random() < 0.2:
            kwargs["feature"] = rng.choice([feature, other])
        kind = rng.choice(["prepaid", "promotional"])
        grant(wallet, Decimal(rng.choice(["1", "3.5", "10", "25.123456", "100", "0.000001"])), kind=kind, **kwargs)
    for _ in range(rng.randrange(0, 3)):
        try:
            reservation_create(customer=customer, wallet_id=wallet.pk, amount=Decimal(rng.choice(["0.5", "2", "8"])),
                               ttl_seconds=rng.choice([5, 3600]), now=now)
        except Exception:  # noqa: BLE001 - a hold that does not fit is simply not part of this world
            pass
    wallet.refresh_from_db()
    if rng.random() < 0.3:
        marks = [Decimal(rng.choice(["0", "1", "5", "20", "50"])) for _ in range(2)]
        Wallet.objects.filter(pk=wallet.pk).update(alert_below=marks[0] if rng.random() < 0.7 else None,
                                                   alert_at_or_above=marks[1] if rng.random() < 0.5 else None)
    if rng.random() < 0.1:
        Wallet.objects.filter(pk=wallet.pk).update(status=Wallet.Status.PAUSED, paused_reason="low balance rule")
    wallet.refresh_from_db()
    return customer, wallet, [feature, feature, feature, other, unpriced]


def _event_stream(rng: random.Random, worlds, now) -> list[dict]:
    stream = []
    for n in range(rng.randrange(4, 16)):
        customer, wallet, features = rng.choice(worlds)
        stream.append({
            "customer": customer,
            "wallet": wallet,
            "feature": rng.choice(features),
            "quantity": Decimal(rng.choice(QUANTITIES)),
            "event_id": f"ev-{rng.randrange(0, 6)}",  # a small pool: duplicates and conflicts happen
            "occurred_at": None if rng.random() < 0.5 else now - timedelta(seconds=rng.randrange(0, 7200)),
            "properties": rng.choice([{}, {"team": "search"}, {"team": "ml", "model": "big"}]),
            "now": now + timedelta(seconds=n * 7),
        })
    return stream


def _requests(stream) -> list[ChargeRequest]:
    return [ChargeRequest(customer=spec["customer"], wallet_id=spec["wallet"].pk, feature=spec["feature"],
                          quantity=spec["quantity"], event_id=spec["event_id"], occurred_at=spec["occurred_at"],
                          properties=dict(spec["properties"])) for spec in stream]


def _answer(result) -> tuple:
    # json.dumps without sort_keys: the key order a client would see is compared too.
    return (result.event_id, result.status, result.http_status, json.dumps(result.body), result.credits,
            json.dumps(result.error))


def _unordered(answer: tuple) -> tuple:
    """The oracle replays bodies in jsonb's key order; the engine now in the first answer's order."""
    event_id, status, http_status, body, credits, error = answer
    return (event_id, status, http_status, json.loads(body), credits, json.loads(error))


ENGINES = {
    "oracle, one by one": lambda stream: [reference_usage.usage_charge(r, now=s["now"])
                                          for r, s in zip(_requests(stream), stream, strict=True)],
    "fast path, one by one": lambda stream: [usage_charge(r, now=s["now"])
                                             for r, s in zip(_requests(stream), stream, strict=True)],
    "python engine, one by one": lambda stream: [usage_charge(r, now=s["now"])
                                                 for r, s in zip(_requests(stream), stream, strict=True)],
    "oracle, one batch": lambda stream: reference_usage.usage_charge_many(_requests(stream), now=stream[0]["now"]),
    "engine, one batch": lambda stream: usage_charge_many(_requests(stream), now=stream[0]["now"]),
    "python engine, one batch": lambda stream: usage_charge_many(_requests(stream), now=stream[0]["now"]),
}


def _books(wallet) -> dict:
    """Everything stored about the wallet, without surrogate keys of rows created by the charges."""
    w = Wallet.objects.get(pk=wallet.pk)
    return {
        "wallet": (w.ledger_balance, w.overage, w.last_sequence, w.status, w.paused_reason),
        "grants": list(CreditGrant.objects.filter(wallet=wallet).order_by("pk").values_list("pk", "remaining",
                                                                                              "status")),
        "entries": list(
            LedgerEntry.objects.filter(wallet=wallet).order_by("sequence").values_list(
                "sequence", "type", "amount", "balance_after", "grant_id", "usage_event__event_id",
                "reservation_id", "reference", "idempotency_key", "memo")),
        "events": [
            (e.event_id, e.status, e.quantity, e.occurred_at, e.properties, e.rate_id, e.credits_per_unit,
             e.credits, e.request_hash, json.dumps(e.response), e.created_at, e.reservation_id, e.feature_id)
            for e in UsageEvent.objects.filter(wallet=wallet).order_by("pk")
        ],
        "holds": list(Reservation.objects.filter(wallet=wallet).order_by("pk").values_list("pk", "status")),
    }


def _shape(allocations: list[dict]) -> str:
    if allocations and allocations[-1].get("overage"):
        return "overage"
    return ("none", "one grant")[len(allocations)] if len(allocations) < 2 else "several grants"


def _first_difference(left, right) -> str:
    if isinstance(left, list) and isinstance(right, list):
        for a, b in zip(left, right, strict=False):
            if a != b:
                return f"{a!r} / oracle {b!r}"
        return f"{len(left)} rows / oracle {len(right)} rows"
    return f"{left!r} / oracle {right!r}"


@pytest.mark.django_db
def test_fast_paths_match_the_previous_engine_on_random_scenarios(monkeypatch):
    crossings: list[tuple] = []

    def record(*, wallet, before, after, cause):
        crossings.append((wallet.pk, str(before), str(after), cause))

    monkeypatch.setattr(events, "_crossing_handlers", [record])
    database_answers = 0
    charged_shapes: Counter = Counter()  # the function's charged answers: no grant, one, several, with overage
    real = usage._charge_one_in_database

    def counting(*args, **kwargs):
        nonlocal database_answers
        result = real(*args, **kwargs)
        database_answers += result is not None
        if result is not None and result.status == "charged":
            charged_shapes[_shape(result.body["allocations"])] += 1
        return result

    monkeypatch.setattr(usage, "_charge_one_in_database", counting)
    batches_in_database = 0
    real_batch = usage._charge_in_database

    def counting_batch(*args, **kwargs):
        nonlocal batches_in_database
        done = real_batch(*args, **kwargs)
        batches_in_database += done
        return done

    monkeypatch.setattr(usage, "_charge_in_database", counting_batch)
    rng = random.Random(20261124)
    compared = 0
    for index in range(60):
        now = timezone.now()
        worlds = [_build_world(rng, f"{index}a", now), _build_world(rng, f"{index}b", now)]
        stream = _event_stream(rng, worlds, now)
        runs = {}
        for name, engine in ENGINES.items():
            monkeypatch.setattr(usage, "FAST_PATH", not name.startswith("python engine"))
            crossings.clear()
            savepoint = transaction.savepoint()
            answers = [_answer(result) for result in engine(stream)]
            runs[name] = (answers, [_books(wallet) for _, wallet, _ in worlds], list(crossings))
            for _, wallet, _ in worlds:
                assert_ledger_consistent(wallet)
            transaction.savepoint_rollback(savepoint)
        for name, (answers, books, hook_calls) in runs.items():
            oracle = runs["oracle, one batch" if "batch" in name else "oracle, one by one"]
            assert [_unordered(a) for a in answers] == [_unordered(a) for a in oracle[0]], (
                f"scenario {index}, {name}: answers differ")
            for wallet_books, oracle_books in zip(books, oracle[1], strict=True):
                for table, rows in oracle_books.items():
                    assert wallet_books[table] == rows, (
                        f"scenario {index}, {name}: stored {table} differ: {_first_difference(wallet_books[table], rows)}")
            assert hook_calls == oracle[2], f"scenario {index}, {name}: balance-crossing hook calls differ"
        # Fast path and Python engine: the same answers byte for byte (key order included).
        assert runs["fast path, one by one"][0] == runs["python engine, one by one"][0]
        compared += len(stream)
    # The comparison means something only if the database function answered most events itself.
    assert database_answers > compared * 0.8
    # Each way the function writes a charge was compared (migration 0020 has one statement for one grant
    # without overage and another for the rest).
    assert min(charged_shapes[shape] for shape in ("none", "one grant", "several grants", "overage")) >= 5, (
        charged_shapes)
    # Every scenario's batch has events to charge; only a limited team's would go back to Python.
    assert batches_in_database >= 50


def _layered_wallet(index: str, feature, other, now, *, policy: str) -> tuple:
    """A wallet whose grants differ in every consumption-order key (DESIGN.md §3), with grants usable
    or not at the exact boundaries of ``now`` (effective at it, expiring at it), feature scopes and a hold."""
    customer = make_customer(f"hp-layers-{index}", policy=policy, credit_limit=Decimal("12.5"))
    wallet = default_wallet(customer)
    day, tick = timedelta(days=1), timedelta(microseconds=1)
    grant(wallet, "2", priority=90, effective_at=now - day)
    grant(wallet, "1.5", kind="promotional", priority=50, effective_at=now - day, expires_at=now + 30 * day)
    grant(wallet, "1.25", priority=50, effective_at=now - day, expires_at=now + 30 * day)  # free before paid
    grant(wallet, "1", priority=50, effective_at=now - 2 * day, expires_at=now + 30 * day)  # older first
    grant(wallet, "3", priority=50, effective_at=now - day, expires_at=now + 2 * day)
    grant(wallet, "0.75", priority=50, effective_at=now - day)  # never expires: after those that do
    grant(wallet, "4", priority=10, effective_at=now - day, feature=other)  # out of scope for ``feature``
    grant(wallet, "0.5", priority=10, effective_at=now - day, feature=feature)
    grant(wallet, "9", priority=0, effective_at=now - 3 * day, expires_at=now)  # expired at ``now`` exactly
    grant(wallet, "7", priority=0, effective_at=now + tick)  # not yet effective
    grant(wallet, "0.25", priority=0, effective_at=now, expires_at=now + tick)  # usable for that instant
    reservation_create(customer=customer, wallet_id=wallet.pk, amount=Decimal("0.5"), ttl_seconds=3600,
                       now=now - timedelta(minutes=1))
    wallet.refresh_from_db()
    return customer, wallet, [feature]


@pytest.mark.django_db
def test_fast_path_matches_the_previous_engine_across_layered_grants(monkeypatch):
    """Charges that walk a wallet's grants one consumption-order key at a time, then run out (block)
    or into overage up to the credit limit (overdraft): the function answers each of them, and its
    answers and rows are the Python engine's and the oracle's."""
    monkeypatch.setattr(events, "_crossing_handlers", [])
    database_answers = []
    real = usage._charge_one_in_database
    monkeypatch.setattr(usage, "_charge_one_in_database",
                        lambda *a, **k: database_answers.append(real(*a, **k)) or database_answers[-1])
    now = timezone.now()
    feature, other = make_feature("hp-layers", "1"), make_feature("hp-layers-other", "1")
    worlds = [_layered_wallet("block", feature, other, now, policy=Wallet.Policy.BLOCK),
              _layered_wallet("overdraft", feature, other, now, policy=Wallet.Policy.OVERDRAFT)]
    stream = [
        {"customer": customer, "wallet": wallet, "feature": feature, "quantity": Decimal(quantity),
         "event_id": f"layer-{n}", "occurred_at": None, "properties": {}, "now": now}
        for customer, wallet, _ in worlds
        for n, quantity in enumerate(["0.25", "1", "2.5", "0.000001", "3", "1.7", "5", "0", "20", "1"])
    ]
    runs = {}
    for name in ("oracle, one by one", "fast path, one by one", "python engine, one by one"):
        monkeypatch.setattr(usage, "FAST_PATH", not name.startswith("python engine"))
        database_answers.clear()
        savepoint = transaction.savepoint()
        answers = [_answer(result) for result in ENGINES[name](stream)]
        runs[name] = (answers, [_books(wallet) for _, wallet, _ in worlds], len(database_answers),
                      sum(answer is not None for answer in database_answers))
        for _, wallet, _ in worlds:
            assert_ledger_consistent(wallet)
        transaction.savepoint_rollback(savepoint)
    oracle_answers, oracle_books, _, _ = runs["oracle, one by one"]
    shapes = Counter(_shape(json.loads(answer[3])["allocations"]) for answer in oracle_answers
                     if answer[1] == "charged")
    assert shapes["several grants"] >= 4 and shapes["overage"] >= 1 and shapes["one grant"] >= 2, shapes
    assert {answer[1] for answer in oracle_answers} >= {"charged", "rejected"}
    for name in ("fast path, one by one", "python engine, one by one"):
        answers, books, _, _ = runs[name]
        assert [_unordered(a) for a in answers] == [_unordered(a) for a in oracle_answers], name
        for wallet_books, expected in zip(books, oracle_books, strict=True):
            for table, rows in expected.items():
                assert wallet_books[table] == rows, f"{name}: {table}: {_first_difference(wallet_books[table], rows)}"
    assert runs["fast path, one by one"][0] == runs["python engine, one by one"][0]
    assert runs["fast path, one by one"][2:] == (len(stream), len(stream))  # the function decided every event


@pytest.mark.django_db
def test_fast_path_covers_every_outcome(monkeypatch, ledger_consistent):
    """Each kind of answer the function gives, checked against values a client would expect."""
    feature = make_feature("hp-outcomes", "2")
    wallet = funded_wallet("5")
    customer = wallet.customer

    def charge(quantity, event_id, **kwargs):
        return usage_charge(ChargeRequest(customer=customer, wallet_id=wallet.pk, feature=feature,
                                          quantity=Decimal(quantity), event_id=event_id, **kwargs))

    calls = []
    real = usage._charge_one_in_database
    monkeypatch.setattr(usage, "_charge_one_in_database", lambda *a, **k: calls.append(1) or real(*a, **k))
    charged = charge("1", "a")
    assert (charged.http_status, charged.body["credits"], charged.body["balance"]) == (
        201, "2.000000", {"available": "3.000000", "ledger_balance": "3.000000"})
    assert charge("1", "a").body == charged.body  # replay
    assert charge("2", "a").http_status == 409  # same id, other payload
    short = charge("2", "b")
    assert (short.http_status, short.body["error"]["details"]) == (
        402, {"required": "4.000000", "available": "3.000000", "event_id": "b"})
    assert charge("2", "b").body == short.body
    unpriced = make_feature("hp-later", "1", effective_from=timezone.now() + timedelta(days=1))
    invalid = usage_charge(ChargeRequest(customer=customer, wallet_id=wallet.pk, feature=unpriced,
                                         quantity=Decimal(1), event_id="c"))
    assert invalid.http_status == 400 and invalid.error["code"] == "invalid_request"
    Wallet.objects.filter(pk=wallet.pk).update(status=Wallet.Status.PAUSED, paused_reason="rule")
    paused = charge("1", "d")
    assert paused.http_status == 402 and paused.body["error"]["details"]["reason"] == "wallet_paused"
    assert len(calls) == 7
    assert UsageEvent.objects.filter(customer=customer).count() == 2  # a and b; paused and invalid store nothing
    ledger_consistent(wallet)


@pytest.mark.django_db
def test_crossing_an_alert_mark_still_calls_the_hook(monkeypatch, feature):
    wallet = funded_wallet("10")
    Wallet.objects.filter(pk=wallet.pk).update(alert_below=Decimal("5"))
    seen = []
    monkeypatch.setattr(events, "_crossing_handlers",
                        [lambda **kw: seen.append((kw["before"], kw["after"], kw["cause"]))])
    for n in range(3):
        usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                   quantity=Decimal(3), event_id=f"x{n}"))
    assert seen == [(Decimal("7.000000"), Decimal("4.000000"), "usage")]


@pytest.mark.django_db
def test_a_batch_in_the_database_crosses_a_mark_once_per_wallet(monkeypatch, feature):
    wallets = [funded_wallet("10"), funded_wallet("10")]
    Wallet.objects.filter(pk=wallets[0].pk).update(alert_below=Decimal("5"))
    seen = []
    monkeypatch.setattr(events, "_crossing_handlers",
                        [lambda **kw: seen.append((kw["wallet"].pk, kw["before"], kw["after"], kw["cause"]))])
    in_database = []
    real = usage._charge_in_database
    monkeypatch.setattr(usage, "_charge_in_database", lambda *a, **k: in_database.append(real(*a, **k)) or
                        in_database[-1])
    results = usage_charge_many([
        ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature, quantity=Decimal(3),
                      event_id=f"x{n}") for n in range(4) for wallet in wallets])
    assert in_database == [True]
    assert [r.http_status for r in results] == [201] * 6 + [402] * 2
    assert seen == [(wallets[0].pk, Decimal("10.000000"), Decimal("1.000000"), "usage")]
    for wallet in wallets:
        assert_ledger_consistent(wallet)


def _threads(count: int, target) -> list:
    answers: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            barrier.wait()
            answers[i] = target(i)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


@pytest.mark.django_db(transaction=True)
def test_sixteen_clients_drain_a_block_wallet_exactly(feature):
    wallet = funded_wallet("50")
    grant(wallet, "25.5", kind="promotional")

    def client(i: int) -> list:
        outcomes = []
        for n in range(12):
            result = usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                                quantity=Decimal("1.5"), event_id=f"t{i}-{n}"))
            outcomes.append((result.http_status, result.credits))
        return outcomes

    answers = [o for per_client in _threads(16, client) for o in per_client]
    charged = sum((credits for status, credits in answers if status == 201), Decimal(0))
    # 75.5 credits fit 50 charges of 1.5 (75.0); the remaining 0.5 can never be spent.
    assert charged == Decimal("75.000000")
    assert {status for status, _ in answers} == {201, 402}
    wallet.refresh_from_db()
    assert wallet.ledger_balance == Decimal("0.5")
    assert UsageEvent.objects.filter(wallet=wallet, status="charged").count() == 50
    assert_ledger_consistent(wallet)


@pytest.mark.django_db(transaction=True)
def test_one_event_id_from_eight_threads_charges_once(feature):
    wallet = funded_wallet("100")

    def client(i: int):
        result = usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                            quantity=Decimal(3), event_id="same"))
        return result.http_status, json.dumps(result.body)

    answers = _threads(8, client)
    assert {body for _, body in answers} == {answers[0][1]}
    assert {status for status, _ in answers} == {201}
    wallet.refresh_from_db()
    assert wallet.ledger_balance == Decimal("97")
    assert LedgerEntry.objects.filter(wallet=wallet, type="usage").count() == 1


@given(
    external_id=st.text(min_size=1, max_size=20),
    key=st.text(min_size=1, max_size=10),
    quantity=st.decimals(min_value=0, max_value=10**12, places=6),
    occurred_at=st.none() | st.datetimes(timezones=st.just(UTC)),
    properties=st.dictionaries(st.text(max_size=5), st.none() | st.booleans() | st.integers() | st.text(max_size=5)
                               | st.lists(st.integers(), max_size=3), max_size=4),
    reservation=st.none() | st.integers(min_value=1, max_value=10**12),
)
def test_request_hash_is_the_hash_of_the_canonical_json(external_id, key, quantity, occurred_at, properties,
                                                         reservation):
    """The key-by-key canonical string is json.dumps's (stored hashes stay comparable)."""
    request = ChargeRequest(customer=Customer(external_id=external_id), wallet_id=1, feature=Feature(key=key),
                            quantity=quantity, event_id="e", occurred_at=occurred_at, properties=properties,
                            reservation_id=reservation)
    canonical = json.dumps({"customer": external_id, "feature": key, "quantity": str(quantity.normalize()),
                            "occurred_at": occurred_at.isoformat() if occurred_at else None,
                            "properties": properties, "reservation": reservation},
                           sort_keys=True, separators=(",", ":"), default=str)
    assert usage.request_hash(request) == hashlib.sha256(canonical.encode()).hexdigest()
