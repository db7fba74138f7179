"""Every field of every POST endpoint, replaced by each nasty value: never a 500,
always the envelope on a 4xx, and nothing moves on the ledger when refused."""

import threading

import pytest
from django.db import connection

from billing.models import LedgerEntry, Reservation, UsageEvent
from billing.services.api_keys import api_key_create
from tests.billing.api.conftest import Api, assert_error, make_api
from tests.factories import funded_wallet, make_feature

NASTY = [
    None, True, False, 0, -1, 10**40, "", " ", "NaN", "-Infinity", "1e400", "1" * 40, "0.0000001", "abc",
    [], [1], {}, {"a": 1}, "x" * 5000, "a\x00b", "\ud800", "2026-13-45T99:99:99Z", "9999-12-31T23:59:59-05:00",
]


@pytest.fixture
def world(db):
    wallet = funded_wallet("100")
    customer = wallet.customer
    customer.external_id = "acme"
    customer.save(update_fields=["external_id"])
    make_feature("api-call", "1")
    reservation = Reservation.objects.create(wallet=wallet, customer=customer, amount=10,
                                             expires_at="2099-01-01T00:00:00Z")
    return wallet, reservation


def endpoints(reservation):
    return [
        ("/api/v1/usage", {"customer": "acme", "feature": "api-call", "quantity": "1", "event_id": "e1",
                           "occurred_at": None, "properties": {}}),
        ("/api/v1/usage/check", {"customer": "acme", "feature": "api-call", "quantity": "1"}),
        ("/api/v1/customers", {"external_id": "new", "name": "New", "email": "a@b.co", "currency": "EUR",
                               "timezone": "UTC"}),
        ("/api/v1/customers/acme/grants", {"amount": "5", "kind": "promotional", "expires_at": None,
                                           "effective_at": None, "priority": 5, "price_paid": None,
                                           "reason": "r", "feature": None}),
        ("/api/v1/features", {"key": "f", "name": "F", "unit": "u", "credits_per_unit": "1",
                              "allow_zero_quantity": False, "effective_from": None}),
        ("/api/v1/features/api-call/costs", {"credits_per_unit": "1", "effective_from": None, "customer": None,
                                             "note": "n"}),
        ("/api/v1/reservations", {"customer": "acme", "amount": "5", "ttl_seconds": 60}),
        (f"/api/v1/reservations/{reservation.pk}/capture", {"amount": "1", "event_id": "cap"}),
    ]


def test_no_nasty_field_value_gets_a_500(world):
    wallet, reservation = world
    api = make_api("admin")
    checked = 0
    for path, base in endpoints(reservation):
        for field in base:
            for value in NASTY:
                body = {k: v for k, v in base.items() if v is not None}
                body[field] = value
                entries_before = LedgerEntry.objects.count()
                status, answer = api.post(path, body, headers={"Idempotency-Key": f"k{checked}"})
                checked += 1
                assert status < 500, (path, field, value, answer)
                if status >= 400:
                    assert set(answer) == {"error"} and answer["error"]["code"], (path, field, value, answer)
                    assert LedgerEntry.objects.count() == entries_before, (path, field, value)
    assert checked > 800


def test_no_nasty_event_in_a_batch_gets_a_500(world):
    api = make_api("usage:write")
    base = {"customer": "acme", "feature": "api-call", "quantity": "1", "event_id": "b"}
    events = []
    for field in ("customer", "feature", "quantity", "event_id", "occurred_at", "properties"):
        for index, value in enumerate(NASTY):
            events.append({**base, "event_id": f"{field}-{index}", field: value})
    status, body = api.post("/api/v1/usage/batch", {"events": events})
    assert status == 200 and len(body["results"]) == len(events)
    assert all(r["status"] in {"charged", "rejected", "duplicate"} for r in body["results"])


@pytest.mark.django_db(transaction=True)
def test_concurrent_captures_of_one_hold_charge_once():
    wallet = funded_wallet("100")
    make_feature("api-call", "1")
    _, raw_key = api_key_create(name="race", scopes=["usage:write"])
    api = Api(raw_key)
    status, hold = api.post("/api/v1/reservations", {"customer": wallet.customer.external_id, "amount": "30"},
                            headers={"Idempotency-Key": "hold"})
    assert status == 201
    answers, barrier = [], threading.Barrier(6)

    def capture(event_id):
        try:
            client = Api(raw_key)
            barrier.wait(timeout=10)
            answers.append(client.post(f"/api/v1/reservations/{hold['id']}/capture",
                                       {"amount": "7", "event_id": event_id}))
        finally:
            connection.close()

    threads = [threading.Thread(target=capture, args=(f"job-{i % 3}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    statuses = sorted(status for status, _ in answers)
    assert len(answers) == 6 and 500 not in statuses
    assert UsageEvent.objects.filter(reservation_id=hold["id"]).count() == 1
    winner = UsageEvent.objects.get(reservation_id=hold["id"]).event_id
    for status, body in answers:
        if status == 201:
            assert body["event_id"] == winner
        else:
            assert_error((status, body), 409, "conflict")
    wallet.refresh_from_db()
    assert str(wallet.ledger_balance) == "93.000000"
