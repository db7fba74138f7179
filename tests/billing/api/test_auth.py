import hashlib

import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.test import override_settings

from billing.models import ApiKey
from billing.services.api_keys import api_key_create, api_key_revoke
from tests.billing.api.conftest import Api, assert_error
from tests.factories import make_customer


@pytest.mark.django_db
def test_no_key_or_bad_key_is_401_in_the_envelope():
    make_customer("acme")
    for api in (Api(None), Api("cdk_000000000000_nope"), Api("not-a-key")):
        error = assert_error(api.get("/api/v1/customers/acme"), 401, "unauthorized")
        assert "key" in error["message"].lower()
    anon = Api(None)
    anon.client.credentials(HTTP_AUTHORIZATION="Basic dXNlcjpwdw==")
    assert_error(anon.get("/api/v1/customers/acme"), 401, "unauthorized")


@pytest.mark.django_db
def test_revoked_key_is_refused_at_once():
    make_customer("acme")
    api_key, raw_key = api_key_create(name="backend", scopes=["balance:read"])
    api = Api(raw_key)
    assert api.get("/api/v1/customers/acme")[0] == 200
    api_key_revoke(api_key_id=api_key.pk)
    assert_error(api.get("/api/v1/customers/acme"), 401, "unauthorized")


@pytest.mark.django_db
def test_missing_scope_is_403_and_admin_may_do_everything(usage_api, read_api, admin_api):
    make_customer("acme")
    assert_error(usage_api.get("/api/v1/customers/acme/balance"), 403, "forbidden")
    assert_error(read_api.post("/api/v1/usage", {"customer": "acme", "feature": "x", "quantity": 1,
                                                 "event_id": "e"}), 403, "forbidden")
    assert_error(usage_api.post("/api/v1/features", {"key": "k", "name": "K", "unit": "u",
                                                     "credits_per_unit": "1"}), 403, "forbidden")
    assert admin_api.get("/api/v1/customers/acme/balance")[0] == 200
    assert admin_api.post("/api/v1/features", {"key": "k", "name": "K", "unit": "u",
                                               "credits_per_unit": "1"})[0] == 201


@pytest.mark.django_db
def test_only_a_hash_is_stored():
    api_key, raw_key = api_key_create(name="backend", scopes=["usage:write"])
    stored = ApiKey.objects.get(pk=api_key.pk)
    assert stored.hashed_key == hashlib.sha256(raw_key.encode()).hexdigest()
    assert raw_key not in str(ApiKey.objects.filter(pk=api_key.pk).values().get())
    assert raw_key.split("_")[1] == stored.prefix


@pytest.mark.django_db
def test_create_api_key_command_prints_the_key_on_its_last_line(capsys):
    make_customer("acme")
    call_command("create_api_key", "product backend", "--scopes", "balance:read", "usage:write")
    raw_key = capsys.readouterr().out.strip().splitlines()[-1]
    stored = ApiKey.objects.get(name="product backend")
    assert stored.scopes == ["usage:write", "balance:read"]
    assert Api(raw_key).get("/api/v1/customers/acme")[0] == 200
    assert_error(Api(raw_key).post("/api/v1/features", {}), 403, "forbidden")


@pytest.mark.django_db
def test_last_used_is_recorded_without_a_write_per_request():
    make_customer("acme")
    api_key, raw_key = api_key_create(name="backend", scopes=["balance:read"])
    api = Api(raw_key)
    api.get("/api/v1/customers/acme")
    first = ApiKey.objects.get(pk=api_key.pk).last_used_at
    assert first is not None
    api.get("/api/v1/customers/acme")
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at == first



@pytest.mark.django_db
@override_settings(CREDITDESK_API_RATE_LIMIT="2/minute")
def test_a_key_over_its_rate_limit_gets_429_rate_limited():
    cache.clear()
    make_customer("acme")
    _, raw_key = api_key_create(name="busy", scopes=["balance:read"])
    api = Api(raw_key)
    assert [api.get("/api/v1/customers/acme")[0] for _ in range(2)] == [200, 200]
    response = api.client.get("/api/v1/customers/acme")
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limited"
    assert int(response["Retry-After"]) > 0
    _, other_key = api_key_create(name="calm", scopes=["balance:read"])
    assert Api(other_key).get("/api/v1/customers/acme")[0] == 200
