import threading
from decimal import Decimal

import pytest
from django.db import connection
from django.test import override_settings

from billing.models import CreditGrant, Customer, IdempotencyRecord, LedgerEntry
from billing.services.api_keys import api_key_create
from billing.services.grants import default_wallet
from billing.services.usage import ChargeRequest, usage_charge
from tests.billing.api.conftest import Api, assert_error
from tests.factories import funded_wallet, grant, make_customer, make_feature


def test_create_customer_with_default_wallet_then_get_it(usage_api, read_api):
    status, body = usage_api.post("/api/v1/customers", {"external_id": "acme", "name": "Acme",
                                                        "email": "ops@acme.test", "timezone": "Europe/Paris"})
    assert status == 201
    assert body["external_id"] == "acme" and body["currency"] == "USD" and body["timezone"] == "Europe/Paris"
    assert body["wallet"]["policy"] == "block" and body["wallet"]["credit_limit"] == "0.000000"
    assert body["created_at"].endswith("+00:00")
    assert read_api.get("/api/v1/customers/acme") == (200, body)
    assert_error(read_api.get("/api/v1/customers/nobody"), 404, "not_found")


def test_external_ids_with_slashes_are_addressable(admin_api):
    assert admin_api.post("/api/v1/customers", {"external_id": "org/42", "name": "Org"})[0] == 201
    assert admin_api.get("/api/v1/customers/org%2F42")[1]["external_id"] == "org/42"
    assert admin_api.get("/api/v1/customers/org/42/balance")[1]["customer"] == "org/42"


def test_existing_external_id_is_409_conflict(admin_api):
    make_customer("acme")
    assert_error(admin_api.post("/api/v1/customers", {"external_id": "acme", "name": "Again"}), 409, "conflict")


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "No id"}, "external_id"),
    ({"external_id": "x" * 256, "name": "Long"}, "external_id"),
    ({"external_id": 42, "name": "Number"}, "external_id"),
    ({"external_id": "a", "name": "A", "currency": "usd"}, "currency"),
    ({"external_id": "a", "name": "A", "timezone": "Mars/Olympus"}, "timezone"),
    ({"external_id": "a", "name": "A", "email": "not-an-email"}, "email"),
    ({"external_id": "a\x00", "name": "A"}, "external_id"),
])
def test_invalid_customer_is_400_naming_the_field(usage_api, body, field):
    assert_error(usage_api.post("/api/v1/customers", body), 400, "invalid_request", field)
    assert not Customer.objects.exists()


def test_customer_creation_replays_with_an_idempotency_key(usage_api):
    body = {"external_id": "acme", "name": "Acme"}
    first = usage_api.post("/api/v1/customers", body, headers={"Idempotency-Key": "c1"})
    assert first[0] == 201
    assert usage_api.post("/api/v1/customers", body, headers={"Idempotency-Key": "c1"}) == first
    assert_error(usage_api.post("/api/v1/customers", {**body, "name": "Other"}, headers={"Idempotency-Key": "c1"}),
                 409, "idempotency_conflict")


def test_balance_shows_available_held_by_kind_and_grants_in_consumption_order(read_api):
    wallet = funded_wallet("100")
    promo = grant(wallet, "10", kind="promotional", priority=10)
    status, body = read_api.get(f"/api/v1/customers/{wallet.customer.external_id}/balance")
    assert status == 200
    assert body["customer"] == wallet.customer.external_id
    assert (body["available"], body["ledger_balance"], body["held"], body["overage"]) == (
        "110.000000", "110.000000", "0.000000", "0.000000")
    assert body["by_kind"]["prepaid"] == "100.000000" and body["by_kind"]["promotional"] == "10.000000"
    assert body["by_kind"]["contract"] == "0.000000"
    assert [g["id"] for g in body["grants"]][0] == promo.pk
    assert set(body["grants"][0]) >= {"id", "kind", "remaining", "original", "priority", "effective_at",
                                      "expires_at", "status"}
    assert body["as_of"].endswith("+00:00")


def test_ledger_is_newest_first_and_cursor_paginated(read_api):
    wallet = funded_wallet("100")
    feature = make_feature("api-call", "1")
    for i in range(7):
        usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                   quantity=Decimal(1), event_id=f"e{i}"))
    url = f"/api/v1/customers/{wallet.customer.external_id}/ledger"
    sequences, cursor, pages = [], None, 0
    while True:
        status, body = read_api.get(url + "?limit=3" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200
        pages += 1
        sequences += [entry["sequence"] for entry in body["results"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sequences == list(range(8, 0, -1)) and pages == 3
    first = read_api.get(url)[1]["results"][0]
    assert set(first) >= {"id", "sequence", "type", "amount", "balance_after", "grant", "reference", "created_at"}
    assert (first["type"], first["amount"], first["balance_after"]) == ("usage", "-1.000000", "93.000000")


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=abc", "limit=-1", "cursor=garbage",
                                   "cursor=eyJrIjogInN0ciJ9", "limit=99999999999999999999"])
def test_bad_page_parameters_are_400(read_api, query):
    make_customer("acme")
    error = assert_error(read_api.get(f"/api/v1/customers/acme/ledger?{query}"), 400, "invalid_request")
    assert set(error["details"]) & {"limit", "cursor"}


def test_grant_requires_admin_and_an_idempotency_key(admin_api, usage_api):
    make_customer("acme")
    body = {"amount": "50", "kind": "promotional", "reason": "welcome"}
    assert_error(usage_api.post("/api/v1/customers/acme/grants", body, headers={"Idempotency-Key": "g"}), 403,
                 "forbidden")
    assert_error(admin_api.post("/api/v1/customers/acme/grants", body), 400, "invalid_request", "Idempotency-Key")
    assert not CreditGrant.objects.exists()


def test_grant_create_replay_and_conflict(admin_api, read_api, ledger_consistent):
    customer = make_customer("acme")
    body = {"amount": 50, "kind": "prepaid", "price_paid": "5.00", "priority": 20,
            "expires_at": "2099-01-01T00:00:00+02:00"}
    first = admin_api.post("/api/v1/customers/acme/grants", body, headers={"Idempotency-Key": "g1"})
    status, grant_body = first
    assert status == 201
    assert (grant_body["status"], grant_body["original"], grant_body["remaining"]) == (
        "active", "50.000000", "50.000000")
    assert grant_body["expires_at"] == "2098-12-31T22:00:00+00:00" and grant_body["price_paid"] == "5.0000"
    assert admin_api.post("/api/v1/customers/acme/grants", body, headers={"Idempotency-Key": "g1"}) == first
    assert_error(admin_api.post("/api/v1/customers/acme/grants", {**body, "amount": 51},
                                headers={"Idempotency-Key": "g1"}), 409, "idempotency_conflict")
    assert CreditGrant.objects.count() == 1
    listed = read_api.get("/api/v1/customers/acme/grants")[1]
    assert [g["id"] for g in listed["results"]] == [grant_body["id"]] and listed["next_cursor"] is None
    ledger_consistent(default_wallet(customer))


@override_settings(CREDITDESK_GRANT_APPROVAL_THRESHOLD=Decimal("1000"))
def test_grant_above_threshold_waits_for_approval(admin_api):
    customer = make_customer("acme")
    status, body = admin_api.post("/api/v1/customers/acme/grants", {"amount": "5000", "kind": "promotional"},
                                  headers={"Idempotency-Key": "big"})
    assert (status, body["status"], body["remaining"]) == (201, "pending_approval", "0.000000")
    assert default_wallet(customer).ledger_balance == 0


@pytest.mark.parametrize(("body", "field"), [
    ({"amount": "0", "kind": "prepaid"}, "amount"),
    ({"amount": "-5", "kind": "prepaid"}, "amount"),
    ({"amount": "1e400", "kind": "prepaid"}, "amount"),
    ({"amount": "5", "kind": "gift"}, "kind"),
    ({"amount": "5", "kind": "prepaid", "priority": 101}, "priority"),
    ({"amount": "5", "kind": "prepaid", "priority": "high"}, "priority"),
    ({"amount": "5", "kind": "prepaid", "expires_at": "2000-01-01T00:00:00Z"}, "expires_at"),
    ({"amount": "5", "kind": "promotional", "price_paid": "3"}, "price_paid"),
    ({"amount": "5", "kind": "prepaid", "price_paid": "NaN"}, "price_paid"),
])
def test_invalid_grant_is_400_and_not_remembered(admin_api, body, field):
    make_customer("acme")
    assert_error(admin_api.post("/api/v1/customers/acme/grants", body, headers={"Idempotency-Key": "k"}), 400,
                 "invalid_request", field)
    assert not CreditGrant.objects.exists() and not IdempotencyRecord.objects.exists()
    fixed = admin_api.post("/api/v1/customers/acme/grants", {"amount": "5", "kind": "prepaid"},
                           headers={"Idempotency-Key": "k"})
    assert fixed[0] == 201


def test_grant_for_unknown_customer_is_404(admin_api):
    assert_error(admin_api.post("/api/v1/customers/nobody/grants", {"amount": "5", "kind": "prepaid"},
                                headers={"Idempotency-Key": "k"}), 404, "not_found")


def test_void_takes_remaining_credits_out_through_a_void_entry(admin_api, ledger_consistent):
    wallet = funded_wallet("30")
    target = wallet.grants.get()
    status, body = admin_api.post(f"/api/v1/grants/{target.pk}/void", {"reason": "refunded"})
    assert (status, body["status"], body["remaining"]) == (200, "voided", "0.000000")
    entry = LedgerEntry.objects.filter(wallet=wallet).order_by("-sequence").first()
    assert (entry.type, entry.amount) == ("void", Decimal("-30"))
    assert admin_api.post(f"/api/v1/grants/{target.pk}/void")[0] == 200
    assert_error(admin_api.post("/api/v1/grants/999999/void"), 404, "not_found")
    assert_error(admin_api.post("/api/v1/grants/99999999999999999999999/void"), 404, "not_found")
    ledger_consistent(wallet)


@pytest.mark.django_db(transaction=True)
def test_same_grant_request_from_8_threads_creates_one_grant():
    make_customer("race")
    _, raw_key = api_key_create(name="race", scopes=["admin"])
    body = {"amount": "25", "kind": "promotional", "reason": "launch"}
    answers, barrier = [], threading.Barrier(8)

    def send():
        try:
            api = Api(raw_key)
            barrier.wait(timeout=10)
            answers.append(api.post("/api/v1/customers/race/grants", body, headers={"Idempotency-Key": "once"}))
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == 8 and all(answer == answers[0] for answer in answers)
    assert answers[0][0] == 201
    assert CreditGrant.objects.count() == 1
    assert default_wallet(Customer.objects.get(external_id="race")).ledger_balance == Decimal("25")
