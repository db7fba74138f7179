"""Subscriptions over the API: start, get, list, change plan (preview and
effect), cancel; idempotency; every error code."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
import time_machine

from billing.models import CreditGrant, Invoice, Plan, Subscription, SubscriptionChange
from billing.services.grants import default_wallet
from tests.billing.api.conftest import Api, assert_error, make_api
from tests.factories import make_customer

pytestmark = pytest.mark.django_db
KEY = {"Idempotency-Key": "s1"}


@pytest.fixture
def plans(db):
    make_customer("acme", timezone_name="UTC")
    basic = Plan.objects.create(code="basic", name="Basic", base_fee=Decimal("30"), included_credits=Decimal("1000"))
    pro = Plan.objects.create(code="pro", name="Pro", base_fee=Decimal("90"), included_credits=Decimal("3000"),
                              overage_policy="overdraft", overage_price=Decimal("0.05"), overage_cap=Decimal("500"))
    return basic, pro


def at(*args):
    return time_machine.travel(datetime(*args, tzinfo=UTC), tick=False)


def start(api: Api, **body) -> dict:
    status, created = api.post("/api/v1/customers/acme/subscriptions", {"plan": "basic", **body}, headers=KEY)
    assert status == 201, created
    return created


def test_start_get_and_list_with_replay_and_idempotency_conflict(plans, admin_api, read_api):
    with at(2026, 4, 1):
        created = start(admin_api)
        assert admin_api.post("/api/v1/customers/acme/subscriptions", {"plan": "basic"}, headers=KEY) == (
            201, created)
        assert_error(admin_api.post("/api/v1/customers/acme/subscriptions", {"plan": "pro"}, headers=KEY), 409,
                     "idempotency_conflict")
        assert_error(admin_api.post("/api/v1/customers/acme/subscriptions", {"plan": "pro"},
                                    headers={"Idempotency-Key": "s2"}), 409, "conflict")
    assert (created["customer"], created["plan"], created["status"], created["cancel_at_period_end"]) == (
        "acme", "basic", "active", False)
    assert (created["current_period_start"], created["current_period_end"]) == (
        "2026-04-01T00:00:00+00:00", "2026-05-01T00:00:00+00:00")
    assert read_api.get(f"/api/v1/subscriptions/{created['id']}") == (200, created)
    assert read_api.get("/api/v1/customers/acme/subscriptions") == (200, {"results": [created], "next_cursor": None})
    assert Subscription.objects.count() == 1


def test_list_is_newest_first_and_cursor_paginated(plans, admin_api, read_api):
    customer = make_customer("multi")
    second = customer.wallets.create(name="Team pool", is_default=False)
    for n, wallet in enumerate((default_wallet(customer), second)):
        status, _ = admin_api.post("/api/v1/customers/multi/subscriptions", {"plan": "basic", "wallet": wallet.pk},
                                   headers={"Idempotency-Key": f"m{n}"})
        assert status == 201
    status, page = read_api.get("/api/v1/customers/multi/subscriptions?limit=1")
    assert status == 200 and page["results"][0]["wallet"] == second.pk and page["next_cursor"]
    status, rest = read_api.get(f"/api/v1/customers/multi/subscriptions?limit=1&cursor={page['next_cursor']}")
    assert [s["wallet"] for s in rest["results"]] == [default_wallet(customer).pk] and rest["next_cursor"] is None


def test_preview_then_change_plan_mid_period(plans, admin_api, read_api):
    with at(2026, 4, 1):
        created = start(admin_api)
    url = f"/api/v1/subscriptions/{created['id']}/change-plan"
    with at(2026, 4, 16):
        status, preview = read_api.post(f"{url}/preview", {"plan": "pro"})
        assert status == 200, preview
        assert (preview["remaining_fraction"], preview["unused_credit"], preview["remaining_charge"],
                preview["net_fee"], preview["credits_delta"], preview["included_after"]) == (
            "0.5000000000", "15.0000", "45.0000", "30.0000", "1000.000000", "2000.000000")
        assert not SubscriptionChange.objects.exists()
        assert_error(read_api.post(url, {"plan": "pro"}, headers=KEY), 403, "forbidden")
        status, body = admin_api.post(url, {"plan": "pro"}, headers=KEY)
        assert status == 200, body
        assert admin_api.post(url, {"plan": "pro"}, headers=KEY) == (200, body)  # replay
    assert body["subscription"]["plan"] == "pro"
    assert (body["change"]["from_plan"], body["change"]["credits_delta"]) == ("basic", "1000.000000")
    grant = CreditGrant.objects.get(pk=body["change"]["included_grant"])
    assert (grant.kind, grant.original_amount) == ("included", Decimal("1000"))
    assert SubscriptionChange.objects.count() == 1


def test_cancel_at_period_end_then_now_is_refused_once_canceled(plans, admin_api):
    with at(2026, 4, 1):
        created = start(admin_api)
    url = f"/api/v1/subscriptions/{created['id']}/cancel"
    with at(2026, 4, 11):
        status, body = admin_api.post(url, {}, headers={"Idempotency-Key": "c1"})
        assert (status, body["cancel_at_period_end"], body["status"]) == (200, True, "active")
        status, body = admin_api.post(url, {"at_period_end": False}, headers={"Idempotency-Key": "c2"})
        assert (status, body["status"], body["canceled_at"]) == (200, "canceled", "2026-04-11T00:00:00+00:00")
        assert_error(admin_api.post(url, {"at_period_end": False}, headers={"Idempotency-Key": "c3"}), 409,
                     "conflict")
        assert_error(admin_api.post(f"/api/v1/subscriptions/{created['id']}/change-plan", {"plan": "pro"},
                                    headers={"Idempotency-Key": "c4"}), 409, "conflict")
    invoice = Invoice.objects.get()
    assert invoice.total == Decimal("10.00")  # 30 − 20 unused days credited


@pytest.mark.parametrize(("method", "path", "body", "status", "code", "field"), [
    ("post", "/api/v1/customers/acme/subscriptions", {"plan": "gold"}, 404, "not_found", "plan"),
    ("post", "/api/v1/customers/nobody/subscriptions", {"plan": "basic"}, 404, "not_found", "customer"),
    ("post", "/api/v1/customers/acme/subscriptions", {}, 400, "invalid_request", "plan"),
    ("post", "/api/v1/customers/acme/subscriptions", {"plan": 7}, 400, "invalid_request", "plan"),
    ("post", "/api/v1/customers/acme/subscriptions", {"plan": "basic", "wallet": 10**12}, 404, "not_found",
     "wallet"),
    ("post", "/api/v1/customers/acme/subscriptions", {"plan": "basic", "start_at": "2026-04-01"}, 400,
     "invalid_request", "start_at"),
    ("post", "/api/v1/customers/acme/subscriptions", {"plan": "retired"}, 400, "invalid_request", "plan"),
    ("get", "/api/v1/subscriptions/999999", None, 404, "not_found", "subscription"),
    ("post", "/api/v1/subscriptions/999999/cancel", {}, 404, "not_found", "subscription"),
    ("get", "/api/v1/customers/acme/subscriptions?limit=0", None, 400, "invalid_request", "limit"),
])
def test_errors_come_in_the_envelope(plans, method, path, body, status, code, field):
    Plan.objects.create(code="retired", name="Retired", active=False)
    api = make_api("admin", "balance:read")
    response = api.get(path) if method == "get" else api.post(path, body, headers={"Idempotency-Key": "e"})
    assert_error(response, status, code, field)


def test_change_plan_refusals_and_auth(plans, admin_api, usage_api):
    Plan.objects.create(code="euro", name="Euro", currency="EUR")
    with at(2026, 4, 1):
        created = start(admin_api)
    url = f"/api/v1/subscriptions/{created['id']}/change-plan"
    with at(2026, 4, 10):
        assert_error(admin_api.post(url, {"plan": "basic"}, headers=KEY), 400, "invalid_request", "plan")
        assert_error(admin_api.post(url, {"plan": "euro"}, headers=KEY), 400, "invalid_request", "plan")
        assert_error(admin_api.post(url, {"plan": "pro"}), 400, "invalid_request", "Idempotency-Key")
        assert_error(usage_api.post(url, {"plan": "pro"}, headers=KEY), 403, "forbidden")
        assert_error(Api(None).post(url, {"plan": "pro"}, headers=KEY), 401, "unauthorized")
        assert_error(admin_api.post(f"{url}/preview", {"plan": "nope"}), 404, "not_found", "plan")
    with at(2026, 5, 1, 0, 1):
        assert_error(admin_api.post(url, {"plan": "pro"}, headers={"Idempotency-Key": "late"}), 409, "conflict")
