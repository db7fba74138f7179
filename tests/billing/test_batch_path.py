"""The batch path (``creditdesk_usage_charge_batch``, migration 0021, and ``charge_batch``)
must answer and store exactly what the Python engine and the per-event API path do.

test_hot_path.py compares engines from a state with no stored events. Here batches
meet events stored by an earlier batch (replays and conflicts decided inside the
function, repeated within the batch too), several wallets per batch, refusals and
charges mixed; and the API's batch parsing and resolving (parsed once per distinct
customer, feature and quantity; resolved with one statement) is compared with the
per-event path it replaces, over well-formed and malformed events.
"""

from __future__ import annotations

import json
import random
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from django.utils import timezone

from billing import events
from billing.api import usage as usage_api
from billing.api.usage import (
    _batch_item,
    _event_id_of,
    _rejected,
    charge_batch,
    check_event,
    parse_usage,
    resolve,
)
from billing.errors import InvalidRequest, NotFound
from billing.models import Feature, UsageEvent, Wallet
from billing.services import usage
from billing.services.grants import default_wallet
from billing.services.usage import ChargeRequest, usage_charge_many
from tests.billing import reference_usage
from tests.billing.test_hot_path import _answer, _books, _build_world, _event_stream, _requests, _unordered
from tests.conftest import assert_ledger_consistent
from tests.factories import grant, make_customer, make_feature

ENGINES = {
    "oracle": lambda stream: reference_usage.usage_charge_many(_requests(stream), now=stream[0]["now"]),
    "engine": lambda stream: usage_charge_many(_requests(stream), now=stream[0]["now"]),
    "python engine": lambda stream: usage_charge_many(_requests(stream), now=stream[0]["now"]),
}


@pytest.mark.django_db
def test_batches_over_stored_events_match_the_oracle(monkeypatch):
    crossings: list[tuple] = []
    monkeypatch.setattr(events, "_crossing_handlers",
                        [lambda *, wallet, before, after, cause: crossings.append((wallet.pk, str(before), str(after)))])
    in_database = []
    real = usage._charge_in_database
    monkeypatch.setattr(usage, "_charge_in_database", lambda *a, **k: in_database.append(real(*a, **k)) or
                        in_database[-1])
    rng = random.Random(20261130)
    replays = 0
    for index in range(40):
        now = timezone.now()
        worlds = [_build_world(rng, f"{index}{side}", now) for side in "abc"]
        # An earlier batch stores events under the same small pool of event ids.
        history = _event_stream(rng, worlds, now)
        reference_usage.usage_charge_many(_requests(history), now=now)
        # The next batch: new events, and replays of stored ones (same payload) among them.
        stream = [spec if rng.random() < 0.6 else {**rng.choice(history), "now": spec["now"]}
                  for spec in _event_stream(rng, worlds, now)]
        stored = set(UsageEvent.objects.filter(wallet__in=[w for _, w, _ in worlds]).values_list(
            "customer_id", "event_id"))
        replays += sum((spec["customer"].id, spec["event_id"]) in stored for spec in stream)
        runs = {}
        for name, engine in ENGINES.items():
            monkeypatch.setattr(usage, "FAST_PATH", name == "engine")
            crossings.clear()
            savepoint = transaction.savepoint()
            answers = [_answer(result) for result in engine(stream)]
            runs[name] = ([_unordered(a) for a in answers], [_books(w) for _, w, _ in worlds], list(crossings))
            for _, wallet, _ in worlds:
                assert_ledger_consistent(wallet)
            transaction.savepoint_rollback(savepoint)
        for name in ("engine", "python engine"):
            assert runs[name][0] == runs["oracle"][0], f"scenario {index}, {name}: answers differ"
            assert runs[name][1] == runs["oracle"][1], f"scenario {index}, {name}: stored rows differ"
            assert runs[name][2] == runs["oracle"][2], f"scenario {index}, {name}: hook calls differ"
    assert replays > 40  # stored events were met: replays and conflicts decided inside the function
    assert in_database.count(True) >= 35  # only a limited team's batch goes back to Python


@pytest.mark.django_db
def test_a_stored_event_repeated_in_a_batch_is_replayed_or_refused_each_time(feature):
    wallet = default_wallet(make_customer("bp-replay"))
    grant(wallet, Decimal("10"))
    customer = wallet.customer

    def request(event_id, quantity):
        return ChargeRequest(customer=customer, wallet_id=wallet.pk, feature=feature, quantity=Decimal(quantity),
                             event_id=event_id)

    first = usage_charge_many([request("a", "2"), request("b", "3")])
    again = usage_charge_many([request("a", "2"), request("a", "5"), request("c", "1"), request("a", "2"),
                               request("c", "1"), request("c", "4"), request("b", "3")])
    assert [(r.status, r.http_status) for r in again] == [
        ("duplicate", 201), ("conflict", 409), ("charged", 201), ("duplicate", 201), ("duplicate", 201),
        ("conflict", 409), ("duplicate", 201)]
    assert again[0].body == first[0].body and again[6].body == first[1].body
    assert again[4].body == again[2].body and again[2].body["credits"] == "1.000000"
    wallet.refresh_from_db()
    assert wallet.ledger_balance == Decimal("4")
    assert_ledger_consistent(wallet)


def _per_event_batch(data, now) -> dict:
    """``charge_batch`` as it was before batch parsing and resolving: each event parsed,
    resolved and checked on its own (``parse_usage``, ``resolve``, ``check_event``)."""
    raw_events = data["events"]
    items: list = [None] * len(raw_events)
    requests, positions = [], []
    for index, raw in enumerate(raw_events):
        try:
            event = parse_usage(raw, with_event_id=True)
        except InvalidRequest as exc:
            items[index] = _rejected(_event_id_of(raw), exc.as_envelope()["error"])
            continue
        try:
            found = resolve(event.customer, event.feature)
            check_event(event, found.feature, now)
        except (InvalidRequest, NotFound) as exc:
            items[index] = _rejected(event.event_id, exc.as_envelope()["error"])
            continue
        requests.append(ChargeRequest(customer=found.customer, wallet_id=found.wallet_id, feature=found.feature,
                                      quantity=event.quantity, event_id=event.event_id,
                                      occurred_at=event.occurred_at, properties=event.properties))
        positions.append(index)
    for index, result in zip(positions, usage_charge_many(requests, now=now), strict=True):
        items[index] = _batch_item(result)
    return {"results": items}


def _nasty_batch(rng: random.Random, now) -> list:
    plain = [("bp-a", "bp-call", "1"), ("bp-a", "bp-call", "1.0"), ("bp-b", "bp-call", "2.5"),
             ("bp-b", "bp-free", "0"), ("bp-a", "bp-paid", "0"), ("bp-b", "bp-call", "3")]
    odd = [
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": "x" * 256},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": ""},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": None},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": 7},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": "nul\x00" + e},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": "évt-" + e},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": "\ud800" + e},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": 1, "event_id": e},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "abc", "event_id": e},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "-1", "event_id": e},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "0.0000001", "event_id": e},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": e, "extra": [1]},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": e,
                   "occurred_at": (now - timedelta(minutes=5)).isoformat()},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": e,
                   "occurred_at": (now - timedelta(days=400)).isoformat()},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": e,
                   "properties": {"team": "ml"}},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": e, "properties": {}},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": "1", "event_id": e, "properties": []},
        lambda e: {"customer": "nobody", "feature": "bp-call", "quantity": "1", "event_id": e},
        lambda e: {"customer": "bp-a", "feature": "nothing", "quantity": "1", "event_id": e},
        lambda e: {"customer": "nobody", "feature": "nothing", "quantity": "1", "event_id": e},
        lambda e: {"customer": "bp-a", "feature": "bp-off", "quantity": "1", "event_id": e},
        lambda e: {"customer": 5, "feature": "bp-call", "quantity": "1", "event_id": e},
        lambda e: {"customer": "bp-a", "feature": None, "quantity": "1", "event_id": e},
        lambda e: {"customer": "bp-a", "feature": ["bp-call"], "quantity": "1", "event_id": e},
        lambda e: {"customer": "bp-a", "feature": "bp-call", "quantity": {"n": 1}, "event_id": e},
        lambda e: "not an event",
        lambda e: None,
        lambda e: [e],
    ]
    batch = []
    for _ in range(rng.randrange(20, 120)):
        event_id = f"e{rng.randrange(0, 40)}"  # repeats: duplicates and conflicts within the batch
        if rng.random() < 0.75:
            customer, feature, quantity = rng.choice(plain)
            batch.append({"customer": customer, "feature": feature, "quantity": quantity, "event_id": event_id})
        else:
            batch.append(rng.choice(odd)(event_id))
    return batch


@pytest.mark.django_db
def test_batch_api_answers_as_the_per_event_path(monkeypatch):
    now = timezone.now()
    for external_id, amount in (("bp-a", "40"), ("bp-b", "25")):
        grant(default_wallet(make_customer(external_id)), Decimal(amount))
    make_feature("bp-call", "1.5")
    make_feature("bp-paid", "1")
    Feature.objects.filter(pk=make_feature("bp-free", "2").pk).update(allow_zero_quantity=True)
    Feature.objects.filter(pk=make_feature("bp-off", "1").pk).update(active=False)
    Wallet.objects.filter(customer__external_id="bp-b").update(policy=Wallet.Policy.OVERDRAFT,
                                                               credit_limit=Decimal("5"))
    monkeypatch.setattr(usage_api.timezone, "now", lambda: now)
    rng = random.Random(1130)
    for index in range(30):
        batch = json.loads(json.dumps(_nasty_batch(rng, now), ensure_ascii=False))
        if index % 2:
            charge_batch({"events": batch[: len(batch) // 3]})  # stored events for the next batch to meet
        usage_api.resolve_cache_clear()
        answers = []
        for per_event in (True, False):
            savepoint = transaction.savepoint()
            body = _per_event_batch({"events": batch}, now) if per_event else charge_batch({"events": batch})[1]
            answers.append((json.dumps(body), [_books(w) for w in Wallet.objects.order_by("pk")]))
            transaction.savepoint_rollback(savepoint)
        assert answers[1][0] == answers[0][0], f"batch {index}: answers differ"
        assert answers[1][1] == answers[0][1], f"batch {index}: stored rows differ"


@pytest.mark.django_db
def test_a_batch_sees_a_feature_deactivated_and_a_default_wallet_moved_at_once():
    customer = make_customer("bp-fresh")
    grant(default_wallet(customer), Decimal("10"))
    feature = make_feature("bp-fresh-call", "1")

    def batch(event_id):
        return charge_batch({"events": [{"customer": "bp-fresh", "feature": "bp-fresh-call", "quantity": "1",
                                         "event_id": event_id}]})[1]["results"][0]

    assert batch("a")["status"] == "charged"
    Feature.objects.filter(pk=feature.pk).update(active=False)  # no signal: no cache is told
    assert batch("b")["error"]["details"] == {"feature": "not found"}
    Feature.objects.filter(pk=feature.pk).update(active=True)
    Wallet.objects.filter(customer=customer).update(is_default=False)
    assert batch("c")["error"]["details"] == {"customer": "not found"}
