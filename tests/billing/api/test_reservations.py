import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from billing.models import Reservation
from billing.services.api_keys import api_key_create
from tests.billing.api.conftest import Api, assert_error
from tests.factories import funded_wallet, make_feature


@pytest.fixture
def wallet(db):
    wallet = funded_wallet("100")
    make_feature("gpu-second", "2")
    return wallet


def hold(api, wallet, key="h1", **body):
    if "amount" not in body and "feature" not in body:
        body["amount"] = "40"
    body = {"customer": wallet.customer.external_id, **body}
    return api.post("/api/v1/reservations", body, headers={"Idempotency-Key": key})


def available(api_client, wallet):
    return api_client.get(f"/api/v1/customers/{wallet.customer.external_id}/balance")[1]["available"]


def test_hold_reduces_available_and_replays(usage_api, read_api, wallet):
    status, body = hold(usage_api, wallet, ttl_seconds=60)
    assert status == 201 and body["status"] == "open" and body["held"] == "40.000000"
    assert set(body) >= {"id", "held", "expires_at", "status"}
    assert available(read_api, wallet) == "60.000000"
    assert hold(usage_api, wallet, ttl_seconds=60) == (status, body)
    assert_error(hold(usage_api, wallet, amount="41"), 409, "idempotency_conflict")
    assert Reservation.objects.count() == 1
    assert usage_api.get(f"/api/v1/reservations/{body['id']}") == (200, body)


def test_hold_by_feature_quantity_and_402_when_it_does_not_fit(usage_api, wallet):
    status, body = hold(usage_api, wallet, feature="gpu-second", quantity="10")
    assert (status, body["held"], body["feature"]) == (201, "20.000000", "gpu-second")
    error = assert_error(hold(usage_api, wallet, key="h2", amount="81"), 402, "insufficient_credits")
    assert error["details"] == {"required": "81.000000", "available": "80.000000"}
    assert hold(usage_api, wallet, key="h2", amount="81")[1]["error"] == error
    assert Reservation.objects.count() == 1


@pytest.mark.parametrize(("body", "field"), [
    ({}, "amount"),
    ({"amount": "5", "feature": "gpu-second", "quantity": "1"}, "amount"),
    ({"feature": "gpu-second"}, "quantity"),
    ({"amount": "-5"}, "amount"),
    ({"amount": "5", "ttl_seconds": 0}, "ttl_seconds"),
    ({"amount": "5", "ttl_seconds": 10**12}, "ttl_seconds"),
    ({"amount": "5", "ttl_seconds": "soon"}, "ttl_seconds"),
])
def test_invalid_hold_is_400(usage_api, wallet, body, field):
    assert_error(hold(usage_api, wallet, **body) if body else usage_api.post(
        "/api/v1/reservations", {"customer": wallet.customer.external_id}, headers={"Idempotency-Key": "x"}),
        400, "invalid_request", field)
    assert not Reservation.objects.exists()


def test_hold_needs_an_idempotency_key_and_known_customer_and_feature(usage_api, wallet):
    assert_error(usage_api.post("/api/v1/reservations", {"customer": wallet.customer.external_id, "amount": "1"}),
                 400, "invalid_request", "Idempotency-Key")
    assert_error(usage_api.post("/api/v1/reservations", {"customer": "nobody", "amount": "1"},
                                headers={"Idempotency-Key": "n"}), 404, "not_found")
    assert_error(hold(usage_api, wallet, feature="nope", quantity="1"), 404, "not_found")


def test_capture_charges_actual_usage_and_frees_the_hold(usage_api, read_api, wallet, ledger_consistent):
    reservation = hold(usage_api, wallet, feature="gpu-second", quantity="10")[1]
    url = f"/api/v1/reservations/{reservation['id']}/capture"
    status, body = usage_api.post(url, {"quantity": "3", "event_id": "job-1"})
    assert status == 201 and body["status"] == "charged" and body["credits"] == "6.000000"
    assert available(read_api, wallet) == "94.000000"
    assert usage_api.post(url, {"quantity": "3", "event_id": "job-1"}) == (status, body)
    assert_error(usage_api.post(url, {"quantity": "3", "event_id": "job-2"}), 409, "conflict")
    assert_error(usage_api.post(f"/api/v1/reservations/{reservation['id']}/release"), 409, "conflict")
    ledger_consistent(wallet)


def test_capture_by_amount_and_bad_captures(usage_api, wallet):
    reservation = hold(usage_api, wallet)[1]
    url = f"/api/v1/reservations/{reservation['id']}/capture"
    assert_error(usage_api.post(url, {"event_id": "j"}), 400, "invalid_request", "quantity")
    assert_error(usage_api.post(url, {"quantity": "1", "amount": "1", "event_id": "j"}), 400, "invalid_request")
    assert_error(usage_api.post(url, {"amount": "NaN", "event_id": "j"}), 400, "invalid_request", "amount")
    assert_error(usage_api.post(url, {"amount": "1"}), 400, "invalid_request", "event_id")
    assert_error(usage_api.post("/api/v1/reservations/424242/capture", {"amount": "1", "event_id": "j"}), 404,
                 "not_found")
    status, body = usage_api.post(url, {"amount": "12.5", "event_id": "j"})
    assert (status, body["credits"]) == (201, "12.500000")


def test_release_frees_the_hold(usage_api, read_api, wallet):
    reservation = hold(usage_api, wallet)[1]
    status, body = usage_api.post(f"/api/v1/reservations/{reservation['id']}/release")
    assert (status, body["status"]) == (200, "released")
    assert available(read_api, wallet) == "100.000000"
    assert_error(usage_api.post("/api/v1/reservations/424242/release"), 404, "not_found")


def test_capturing_an_expired_hold_is_409_conflict_and_charges_nothing(usage_api, read_api, wallet):
    reservation = hold(usage_api, wallet, ttl_seconds=60)[1]
    Reservation.objects.filter(pk=reservation["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert available(read_api, wallet) == "100.000000"
    assert_error(usage_api.post(f"/api/v1/reservations/{reservation['id']}/capture",
                                {"amount": "5", "event_id": "late"}), 409, "conflict")
    wallet.refresh_from_db()
    assert wallet.ledger_balance == Decimal("100")


@pytest.mark.django_db(transaction=True)
def test_same_hold_request_from_8_threads_holds_once():
    wallet = funded_wallet("100")
    _, raw_key = api_key_create(name="race", scopes=["usage:write"])
    body = {"customer": wallet.customer.external_id, "amount": "30"}
    answers, barrier = [], threading.Barrier(8)

    def send():
        try:
            api = Api(raw_key)
            barrier.wait(timeout=10)
            answers.append(api.post("/api/v1/reservations", body, headers={"Idempotency-Key": "job-7"}))
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == 8 and all(answer == answers[0] for answer in answers)
    assert answers[0][0] == 201
    assert Reservation.objects.filter(wallet=wallet).count() == 1
