import json
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from billing.models import LedgerEntry, UsageEvent, Wallet
from billing.services.api_keys import api_key_create
from billing.services.grants import default_wallet
from tests.billing.api.conftest import Api, assert_error
from tests.factories import funded_wallet, grant, make_feature


def ledger_snapshot(wallet: Wallet):
    wallet.refresh_from_db()
    return (wallet.ledger_balance, list(LedgerEntry.objects.filter(wallet=wallet).values_list("pk", flat=True)))


@pytest.fixture
def acme(db):
    wallet = funded_wallet("100")
    wallet.customer.external_id = "acme"
    wallet.customer.save(update_fields=["external_id"])
    make_feature("api-call", "2")
    return wallet


def event(**overrides):
    body = {"customer": "acme", "feature": "api-call", "quantity": "3", "event_id": "evt-1"}
    body.update(overrides)
    return body


def test_charge_returns_201_with_allocations_and_balance(usage_api, acme, ledger_consistent):
    status, body = usage_api.post("/api/v1/usage", event(properties={"team": "search", "tokens": 1.5}))
    assert status == 201
    assert body["event_id"] == "evt-1" and body["status"] == "charged" and body["credits"] == "6.000000"
    assert body["allocations"] == [{"grant": acme.grants.get().pk, "amount": "6.000000"}]
    assert body["balance"] == {"available": "94.000000", "ledger_balance": "94.000000"}
    assert UsageEvent.objects.get(event_id="evt-1").properties == {"team": "search", "tokens": 1.5}
    ledger_consistent(acme)


def test_json_numbers_are_accepted_and_exact(usage_api, acme):
    status, body = usage_api.post("/api/v1/usage", raw='{"customer":"acme","feature":"api-call",'
                                  '"quantity":0.1,"event_id":"n1"}')
    assert (status, body["credits"]) == (201, "0.200000")


def test_replay_returns_the_same_answer_and_a_different_payload_is_409(usage_api, acme):
    first = usage_api.post("/api/v1/usage", event())
    assert usage_api.post("/api/v1/usage", event()) == first
    assert_error(usage_api.post("/api/v1/usage", event(quantity="4")), 409, "idempotency_conflict")
    assert UsageEvent.objects.count() == 1
    acme.refresh_from_db()
    assert acme.ledger_balance == Decimal("94")


def test_insufficient_credits_is_402_with_amounts_and_charges_nothing(usage_api, acme):
    before = ledger_snapshot(acme)
    error = assert_error(usage_api.post("/api/v1/usage", event(quantity="51")), 402, "insufficient_credits")
    assert error["details"]["required"] == "102.000000" and error["details"]["available"] == "100.000000"
    assert ledger_snapshot(acme) == before
    assert usage_api.post("/api/v1/usage", event(quantity="51"))[1]["error"] == error


def test_unknown_customer_or_feature_is_404(usage_api, acme):
    assert_error(usage_api.post("/api/v1/usage", event(customer="nobody")), 404, "not_found", "customer")
    assert_error(usage_api.post("/api/v1/usage", event(feature="nothing")), 404, "not_found", "feature")
    assert_error(usage_api.post("/api/v1/usage", event(feature="f" * 150)), 404, "not_found", "feature")


def test_zero_quantity_only_where_the_feature_allows_it(usage_api, acme):
    assert_error(usage_api.post("/api/v1/usage", event(quantity="0")), 400, "invalid_request", "quantity")
    free = make_feature("ping", "1")
    free.allow_zero_quantity = True
    free.save()
    status, body = usage_api.post("/api/v1/usage", event(feature="ping", quantity=0, event_id="z"))
    assert (status, body["credits"]) == (201, "0.000000")


def far(days):
    return (timezone.now() + timedelta(days=days)).isoformat()


BAD_EVENTS = [
    ("negative", event(quantity="-1"), "quantity"),
    ("negative number", event(quantity=-5), "quantity"),
    ("NaN string", event(quantity="NaN"), "quantity"),
    ("Infinity string", event(quantity="Infinity"), "quantity"),
    ("1e400 string", event(quantity="1e400"), "quantity"),
    ("40 digits", event(quantity="1" * 40), "quantity"),
    ("40-digit number", event(quantity=int("9" * 40)), "quantity"),
    ("too many decimals", event(quantity="1.0000001"), "quantity"),
    ("word", event(quantity="abc"), "quantity"),
    ("empty string", event(quantity=""), "quantity"),
    ("boolean", event(quantity=True), "quantity"),
    ("list", event(quantity=[1]), "quantity"),
    ("object", event(quantity={"v": 1}), "quantity"),
    ("missing quantity", {k: v for k, v in event().items() if k != "quantity"}, "quantity"),
    ("missing customer", {k: v for k, v in event().items() if k != "customer"}, "customer"),
    ("missing feature", {k: v for k, v in event().items() if k != "feature"}, "feature"),
    ("missing event_id", {k: v for k, v in event().items() if k != "event_id"}, "event_id"),
    ("numeric event_id", event(event_id=12), "event_id"),
    ("empty event_id", event(event_id=""), "event_id"),
    ("5000-char event_id", event(event_id="e" * 5000), "event_id"),
    ("5000-char customer", event(customer="c" * 5000), "customer"),
    ("NUL in event_id", event(event_id="a\x00b"), "event_id"),
    ("list customer", event(customer=["acme"]), "customer"),
    ("properties not object", event(properties=[1, 2]), "properties"),
    ("properties too big", event(properties={"blob": "x" * 20000}), "properties"),
    ("NUL in properties", event(properties={"k": "a\x00"}), "properties"),
    ("far past", event(occurred_at=far(-400)), "occurred_at"),
    ("far future", event(occurred_at=far(30)), "occurred_at"),
    ("no offset", event(occurred_at="2026-01-01T00:00:00"), "occurred_at"),
    ("not a date", event(occurred_at="yesterday"), "occurred_at"),
    ("year 0 overflow", event(occurred_at="0001-01-01T00:00:00+05:00"), "occurred_at"),
    ("year 10000 overflow", event(occurred_at="9999-12-31T23:59:59-05:00"), "occurred_at"),
    ("numeric timestamp", event(occurred_at=1700000000), "occurred_at"),
]


@pytest.mark.parametrize(("label", "body", "field"), BAD_EVENTS, ids=[b[0] for b in BAD_EVENTS])
def test_bad_event_is_400_naming_the_field_and_charges_nothing(usage_api, acme, label, body, field):
    before = ledger_snapshot(acme)
    assert_error(usage_api.post("/api/v1/usage", body), 400, "invalid_request", field)
    assert ledger_snapshot(acme) == before
    assert not UsageEvent.objects.exists()


RAW_BODIES = [
    ("malformed JSON", '{"customer": "acme", "quantity": ', "application/json", 400),
    ("NaN literal", '{"customer":"acme","feature":"api-call","quantity":NaN,"event_id":"x"}', "application/json", 400),
    ("Infinity literal", '{"customer":"acme","feature":"api-call","quantity":Infinity,"event_id":"x"}',
     "application/json", 400),
    ("1e400 number", '{"customer":"acme","feature":"api-call","quantity":1e400,"event_id":"x"}', "application/json",
     400),
    ("huge integer", '{"customer":"acme","feature":"api-call","quantity":' + "9" * 5000 + ',"event_id":"x"}',
     "application/json", 400),
    ("deep nesting", '{"properties":' + "[" * 100000 + "]" * 100000 + "}", "application/json", 400),
    ("lone surrogate", '{"customer":"acme","feature":"api-call","quantity":1,"event_id":"\\ud800"}',
     "application/json", 400),
    ("body is a list", "[1, 2, 3]", "application/json", 400),
    ("body is a string", '"charge"', "application/json", 400),
    ("empty body", "", "application/json", 400),
    ("invalid UTF-8", b'{"customer": "\xff\xfe"}', "application/json", 400),
    ("form encoded", "customer=acme&quantity=1", "application/x-www-form-urlencoded", 415),
    ("plain text", "charge acme 1", "text/plain", 415),
]


@pytest.mark.parametrize(("label", "raw", "content_type", "status"), RAW_BODIES, ids=[r[0] for r in RAW_BODIES])
def test_malformed_bodies_get_the_envelope_never_500(usage_api, acme, label, raw, content_type, status):
    before = ledger_snapshot(acme)
    assert_error(usage_api.post("/api/v1/usage", raw=raw, content_type=content_type), status, "invalid_request")
    assert ledger_snapshot(acme) == before


def test_batch_charges_valid_events_and_rejects_bad_ones_in_order(usage_api, acme, ledger_consistent):
    events = [
        event(event_id="b1", quantity="1"),
        event(event_id="b2", quantity="NaN"),
        event(event_id="b3", customer="nobody"),
        "not an event",
        event(event_id="b1", quantity="1"),
        event(event_id="b4", quantity="1000"),
        event(event_id="b5", quantity=2),
    ]
    status, body = usage_api.post("/api/v1/usage/batch", {"events": events})
    assert status == 200
    results = body["results"]
    assert [r["status"] for r in results] == ["charged", "rejected", "rejected", "rejected", "duplicate",
                                              "rejected", "charged"]
    assert [r["event_id"] for r in results] == ["b1", "b2", "b3", None, "b1", "b4", "b5"]
    assert results[0]["credits"] == "2.000000" and results[6]["credits"] == "4.000000"
    assert results[1]["error"]["code"] == "invalid_request" and "quantity" in results[1]["error"]["details"]
    assert results[2]["error"]["code"] == "not_found"
    assert results[5]["error"]["code"] == "insufficient_credits"
    acme.refresh_from_db()
    assert acme.ledger_balance == Decimal("94")
    ledger_consistent(acme)
    again = usage_api.post("/api/v1/usage/batch", {"events": [event(event_id="b1", quantity="1")]})[1]
    assert again["results"] == [{"event_id": "b1", "status": "duplicate", "credits": "2.000000"}]


@pytest.mark.parametrize("body", [{}, {"events": []}, {"events": "x"}, {"events": [event()] * 1001}, [event()]])
def test_batch_shape_errors_are_400(usage_api, acme, body):
    assert_error(usage_api.post("/api/v1/usage/batch", body), 400, "invalid_request")


def test_batch_of_1000_events(usage_api, acme):
    events = [event(event_id=f"k{i}", quantity="0.01") for i in range(1000)]
    status, body = usage_api.post("/api/v1/usage/batch", {"events": events})
    assert status == 200 and {r["status"] for r in body["results"]} == {"charged"}
    acme.refresh_from_db()
    assert acme.ledger_balance == Decimal("80")


def test_check_prices_without_charging(usage_api, acme):
    before = ledger_snapshot(acme)
    body = {k: v for k, v in event(quantity="10").items() if k != "event_id"}
    assert usage_api.post("/api/v1/usage/check", body) == (
        200, {"allowed": True, "credits": "20.000000", "available": "100.000000"})
    body["quantity"] = "50.5"
    assert usage_api.post("/api/v1/usage/check", body)[1] == {
        "allowed": False, "credits": "101.000000", "available": "100.000000"}
    assert ledger_snapshot(acme) == before and not UsageEvent.objects.exists()
    assert_error(usage_api.post("/api/v1/usage/check", {**body, "feature": "nope"}), 404, "not_found")
    assert_error(usage_api.post("/api/v1/usage/check", {**body, "quantity": "-1"}), 400, "invalid_request",
                 "quantity")


def test_check_sees_feature_scoped_grants(usage_api, acme):
    grant(acme, "5", kind="promotional", feature=make_feature("images", "1"))
    body = {"customer": "acme", "feature": "images", "quantity": "1"}
    assert usage_api.post("/api/v1/usage/check", body)[1]["available"] == "105.000000"


@pytest.mark.django_db(transaction=True)
def test_same_event_from_8_threads_charges_once_with_8_identical_answers():
    wallet = funded_wallet("100")
    wallet.customer.external_id = "race"
    wallet.customer.save(update_fields=["external_id"])
    make_feature("api-call", "2")
    _, raw_key = api_key_create(name="race", scopes=["usage:write"])
    body = {"customer": "race", "feature": "api-call", "quantity": "5", "event_id": "same"}
    answers = []
    barrier = threading.Barrier(8)

    def send():
        try:
            api = Api(raw_key)
            barrier.wait(timeout=10)
            answers.append(api.post("/api/v1/usage", body))
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == 8
    assert all(answer == answers[0] for answer in answers), json.dumps(answers)[:500]
    assert answers[0][0] == 201
    assert UsageEvent.objects.filter(event_id="same").count() == 1
    assert default_wallet(wallet.customer).ledger_balance == Decimal("90")
    assert LedgerEntry.objects.filter(wallet=wallet, type="usage").count() == 1
