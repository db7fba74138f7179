from datetime import timedelta
from decimal import Decimal

from django.utils import timezone

from billing.models import Feature, FeatureCost, UsageEvent
from tests.billing.api.conftest import assert_error
from tests.factories import funded_wallet, make_feature


def test_create_feature_then_list_it_with_its_current_cost(admin_api, read_api):
    status, body = admin_api.post("/api/v1/features", {"key": "gpt-tokens", "name": "GPT tokens", "unit": "token",
                                                       "credits_per_unit": 0.0002})
    assert status == 201
    assert body == {"key": "gpt-tokens", "name": "GPT tokens", "unit": "token",
                    "credits_per_unit": "0.0002000000", "allow_zero_quantity": False, "active": True}
    make_feature("api-call", "1.5")
    status, listed = read_api.get("/api/v1/features")
    assert status == 200 and listed["next_cursor"] is None
    costs = {f["key"]: f["credits_per_unit"] for f in listed["results"]}
    assert costs["gpt-tokens"] == "0.0002000000" and costs["api-call"] == "1.5000000000"


def test_features_list_is_cursor_paginated_by_key(read_api):
    for key in ("a", "b", "c", "d"):
        make_feature(key, "1")
    seen, cursor = [], None
    while True:
        body = read_api.get("/api/v1/features?limit=2" + (f"&cursor={cursor}" if cursor else ""))[1]
        seen += [f["key"] for f in body["results"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(Feature.objects.values_list("key", flat=True))


def test_duplicate_feature_key_is_409_and_bad_input_400(admin_api):
    make_feature("api-call", "1")
    assert_error(admin_api.post("/api/v1/features", {"key": "api-call", "name": "Again", "unit": "call",
                                                     "credits_per_unit": "1"}), 409, "conflict")
    assert_error(admin_api.post("/api/v1/features", {"key": "has space", "name": "X", "unit": "u",
                                                     "credits_per_unit": "1"}), 400, "invalid_request", "key")
    assert_error(admin_api.post("/api/v1/features", {"key": "k", "name": "X", "unit": "u",
                                                     "credits_per_unit": "-1"}), 400, "invalid_request",
                 "credits_per_unit")


def test_new_cost_version_prices_new_usage_and_past_charges_keep_their_price(admin_api, usage_api):
    wallet = funded_wallet("1000")
    make_feature("api-call", "1")
    external_id = wallet.customer.external_id
    charge = {"customer": external_id, "feature": "api-call", "quantity": "10"}
    assert usage_api.post("/api/v1/usage", {**charge, "event_id": "before"})[1]["credits"] == "10.000000"
    status, body = admin_api.post("/api/v1/features/api-call/costs", {"credits_per_unit": "3"})
    assert status == 201 and body["feature"] == "api-call" and body["credits_per_unit"] == "3.0000000000"
    assert usage_api.post("/api/v1/usage", {**charge, "event_id": "after"})[1]["credits"] == "30.000000"
    assert UsageEvent.objects.get(event_id="before").credits == Decimal("10")
    assert usage_api.post("/api/v1/usage", {**charge, "event_id": "before"})[1]["credits"] == "10.000000"


def test_customer_override_and_cost_errors(admin_api):
    wallet = funded_wallet("10")
    make_feature("api-call", "1")
    status, body = admin_api.post("/api/v1/features/api-call/costs", {
        "credits_per_unit": "0.5", "customer": wallet.customer.external_id, "note": "negotiated"})
    assert status == 201 and body["customer"] == wallet.customer.external_id
    assert FeatureCost.objects.filter(customer=wallet.customer).count() == 1
    past = (timezone.now() - timedelta(days=3)).isoformat()
    assert_error(admin_api.post("/api/v1/features/api-call/costs", {"credits_per_unit": "2", "effective_from": past}),
                 400, "invalid_request", "effective_from")
    assert_error(admin_api.post("/api/v1/features/nope/costs", {"credits_per_unit": "2"}), 404, "not_found")
    assert_error(admin_api.post("/api/v1/features/api-call/costs", {"credits_per_unit": "2", "customer": "nobody"}),
                 404, "not_found")
    later = (timezone.now() + timedelta(days=3)).isoformat()
    assert admin_api.post("/api/v1/features/api-call/costs", {"credits_per_unit": "2", "effective_from": later})[0] \
        == 201
    assert_error(admin_api.post("/api/v1/features/api-call/costs", {"credits_per_unit": "4", "effective_from": later}),
                 409, "conflict")


def test_zero_and_tiny_rates_are_plain_decimal_strings(admin_api, read_api):
    """A rate with 10 places is never shown in exponent form ("0E-10", "1.000E-7"): the schema's pattern."""
    status, body = admin_api.post("/api/v1/features", {"key": "free", "name": "Free", "unit": "call",
                                                       "credits_per_unit": "0"})
    assert status == 201 and body["credits_per_unit"] == "0.0000000000"
    status, body = admin_api.post("/api/v1/features/free/costs", {"credits_per_unit": "0.0000001"})
    assert status == 201 and body["credits_per_unit"] == "0.0000001000"
    listed = {f["key"]: f["credits_per_unit"] for f in read_api.get("/api/v1/features")[1]["results"]}
    assert listed["free"] == "0.0000001000"
