"""The hot routes' plain-Django path (billing/api/fast.py) answers byte for byte
as their DRF views do. A query string sends a request down the DRF view, so
each pair below is the same request through both paths."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from billing.models import Wallet
from billing.services.api_keys import api_key_create
from tests.factories import funded_wallet, grant, make_feature

HEADERS = ("Content-Type", "Allow", "X-Frame-Options", "Content-Length")


@pytest.fixture
def acme(db):
    wallet = funded_wallet("100")
    wallet.customer.external_id = "acme"
    wallet.customer.save(update_fields=["external_id"])
    make_feature("api-call", "2")
    return wallet


@pytest.fixture
def client(db):
    _, raw_key = api_key_create(name="fast", scopes=["usage:write", "balance:read"])
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw_key}")


def both(client, method: str, path: str, body: str | None = None, **extra):
    """(fast, drf) responses to the same request."""
    call = getattr(client, method)
    kwargs = {"data": body, "content_type": "application/json"} if body is not None else {}
    return call(path, **kwargs, **extra), call(f"{path}?via=drf", **kwargs, **extra)


def same(fast, drf):
    assert (fast.status_code, fast.content) == (drf.status_code, drf.content)
    assert {h: fast.get(h) for h in HEADERS} == {h: drf.get(h) for h in HEADERS}
    assert fast.has_header("Content-Length")


def test_charge_then_replay_through_the_other_path_is_byte_identical(client, acme):
    body = '{"customer":"acme","feature":"api-call","quantity":"3","event_id":"e1","properties":{"n":1.50}}'
    first = client.post("/api/v1/usage", body, content_type="application/json")
    replay = client.post("/api/v1/usage?via=drf", body, content_type="application/json")
    assert first.status_code == 201 and first.json()["credits"] == "6.000000"
    assert not hasattr(first, "renderer_context") and hasattr(replay, "renderer_context")  # the two paths
    same(first, replay)
    replay_fast = client.post("/api/v1/usage", body, content_type="application/json")
    same(replay_fast, replay)


@pytest.mark.parametrize("body", [
    '{"customer":"nobody","feature":"api-call","quantity":"1","event_id":"x"}',
    '{"customer":"acme","feature":"nope","quantity":"1","event_id":"x"}',
    '{"customer":"acme","feature":"api-call","quantity":"-1","event_id":"x"}',
    '{"customer":"acme","feature":"api-call","quantity":"1"}',
    '{"customer":"acme","feature":"api-call","quantity":"1e999","event_id":"x"}',
    '[1, 2]',
    '{"customer": NaN}',
    '{"customer":"acme","feature":"api-call","quantity":"999999","event_id":"big"}',
])
def test_refusals_are_identical(client, acme, body):
    same(*both(client, "post", "/api/v1/usage", body))


def test_bad_or_missing_key_and_scope_are_the_drf_answers(acme):
    _, read_only = api_key_create(name="read", scopes=["balance:read"])
    body = '{"customer":"acme","feature":"api-call","quantity":"1","event_id":"x"}'
    for auth, status in ((None, 401), ("Bearer cdk_nope_nope", 401), ("Basic abc", 401),
                         (f"Bearer {read_only}", 403)):
        client = Client(HTTP_AUTHORIZATION=auth) if auth else Client()
        fast, drf = both(client, "post", "/api/v1/usage", body)
        assert fast.status_code == status
        same(fast, drf)
        assert fast.get("WWW-Authenticate") == drf.get("WWW-Authenticate")


def test_batch_is_identical(client, acme):
    events = ",".join(f'{{"customer":"acme","feature":"api-call","quantity":"1","event_id":"b{i}"}}' for i in range(3))
    events += ',{"customer":"zz","feature":"api-call","quantity":"1","event_id":"b9"},{"quantity":"x"}'
    fast, drf = both(client, "post", "/api/v1/usage/batch", f'{{"events":[{events}]}}')
    assert [item["status"] for item in fast.json()["results"]] == ["charged"] * 3 + ["rejected"] * 2
    # The DRF call replays the same events: duplicates with the first answers.
    assert fast.content.replace(b'"charged"', b'"duplicate"') == drf.content
    assert {h: fast.get(h) for h in HEADERS[:3]} == {h: drf.get(h) for h in HEADERS[:3]}
    same(*both(client, "post", "/api/v1/usage/batch", '{"events":[]}'))


def test_balance_is_identical(client, acme):
    now = timezone.now()
    feature = make_feature("export", "1")
    grant(acme, "5", kind="promotional", expires_at=now + timedelta(days=3))
    grant(acme, "7", feature=feature)
    Wallet.objects.filter(pk=acme.pk).update(policy=Wallet.Policy.OVERDRAFT, credit_limit="10")
    fast, drf = both(client, "get", "/api/v1/customers/acme/balance")
    assert fast.status_code == 200 and not hasattr(fast, "renderer_context")
    fast_body, drf_body = fast.json(), drf.json()
    assert fast_body.pop("as_of") <= drf_body.pop("as_of")
    assert fast_body == drf_body
    assert [g["feature"] for g in fast_body["grants"]].count("export") == 1
    assert fast_body["available"] == "115.000000"  # unscoped 105 + overdraft headroom 10
    same(*both(client, "get", "/api/v1/customers/nobody/balance"))
    same(*both(client, "get", "/api/v1/customers/" + "x" * 300 + "/balance"))


def test_rate_limit_counts_each_request_once(client, acme, settings):
    from django.core.cache import cache

    cache.clear()
    settings.CREDITDESK_API_RATE_LIMIT = "2/minute"
    statuses = [client.get("/api/v1/customers/acme/balance").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    cache.clear()
