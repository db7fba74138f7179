"""``HotRoutesApplication`` (config/wsgi.py) answers the hot routes exactly as the
Django application does — status, every header, body — and hands everything
else to it."""

from __future__ import annotations

import io
import json
import sys

import pytest
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, transaction

from billing.api.fast import HotRoutesApplication
from billing.models import UsageEvent
from billing.services.api_keys import api_key_create
from config.wsgi import django_application
from tests.factories import funded_wallet, make_feature

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _keep_the_test_connection():
    """As Django's test client does: the request signals must not close the test's connection."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def acme(db):
    wallet = funded_wallet("100")
    wallet.customer.external_id = "acme/eu"
    wallet.customer.save(update_fields=["external_id"])
    make_feature("api-call", "2")
    return wallet


@pytest.fixture
def keys(db):
    return {scope: api_key_create(name=scope, scopes=[scope])[1] for scope in ("usage:write", "balance:read")}


def environ(method: str, path: str, *, key: str | None, body: bytes | None = None, **extra) -> dict:
    env = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1", "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body or b""), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
        "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.version": (1, 0), "SCRIPT_NAME": "",
        "REMOTE_ADDR": "127.0.0.1",
    }
    if key:
        env["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    if body is not None:
        env["CONTENT_TYPE"] = "application/json"
        env["CONTENT_LENGTH"] = str(len(body))
    env.update(extra)
    return env


def call(application, env: dict) -> tuple[str, list, bytes]:
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, headers

    chunks = application(env, start_response)
    try:
        body = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    return seen["status"], sorted(seen["headers"]), body


def both(make_env, served_here: bool):
    """(hot, django) answers to the same request; ``served_here`` says whether the hot
    application answered itself (else it handed the request to Django)."""
    fallbacks = []

    def django_spy(env, start_response):
        fallbacks.append(env["PATH_INFO"])
        return django_application(env, start_response)

    # The same database state for both: the hot answer's effects are rolled back first.
    savepoint = transaction.savepoint()
    hot = call(HotRoutesApplication(django_spy), make_env())
    transaction.savepoint_rollback(savepoint)
    assert bool(fallbacks) != served_here, fallbacks
    return hot, call(django_application, make_env())


def charge(event_id="e1", quantity="3", customer="acme/eu") -> bytes:
    return json.dumps({"customer": customer, "feature": "api-call", "quantity": quantity,
                       "event_id": event_id}).encode()


def test_a_charge_is_answered_as_django_answers_it(acme, keys):
    hot, django = both(lambda: environ("POST", "/api/v1/usage", key=keys["usage:write"], body=charge()), True)
    assert hot == django
    assert hot[0] == "201 Created" and json.loads(hot[2])["credits"] == "6.000000"
    assert ("X-Frame-Options", "DENY") in hot[1] and ("Content-Length", str(len(hot[2]))) in hot[1]
    assert UsageEvent.objects.count() == 1


@pytest.mark.parametrize("body, status", [
    (charge(customer="nobody"), "404 Not Found"),
    (charge(quantity="-1"), "400 Bad Request"),
    (charge(quantity="1000000000"), "402 Payment Required"),
])
def test_refusals_are_identical(acme, keys, body, status):
    hot, django = both(lambda: environ("POST", "/api/v1/usage", key=keys["usage:write"], body=body), True)
    assert hot == django and hot[0] == status


def test_batch_and_balance_are_identical(acme, keys):
    batch = json.dumps({"events": [json.loads(charge(f"b{n}", "1")) for n in range(3)]}).encode()
    hot, django = both(lambda: environ("POST", "/api/v1/usage/batch", key=keys["usage:write"], body=batch), True)
    assert hot == django and hot[0] == "200 OK"
    # The customer id holds a "/": the path converter takes it whole, as Django's resolver does.
    hot, django = both(lambda: environ("GET", "/api/v1/customers/acme/eu/balance", key=keys["balance:read"]), True)
    assert hot[:2] == django[:2]
    hot_body, django_body = json.loads(hot[2]), json.loads(django[2])
    assert hot_body.pop("as_of") <= django_body.pop("as_of")  # read a moment apart
    assert hot_body == django_body and hot_body["available"] == "94.000000"
    hot, django = both(lambda: environ("GET", "/api/v1/customers/nobody/balance", key=keys["balance:read"]), True)
    assert hot == django and hot[0] == "404 Not Found"


@pytest.mark.parametrize("make_env", [
    lambda keys: environ("POST", "/api/v1/usage", key=None, body=charge()),  # no key: 401
    lambda keys: environ("POST", "/api/v1/usage", key="cdk_wrong", body=charge()),
    lambda keys: environ("POST", "/api/v1/usage", key=keys["balance:read"], body=charge()),  # scope: 403
    lambda keys: environ("POST", "/api/v1/usage", key=keys["usage:write"], body=b"{not json"),
    lambda keys: environ("POST", "/api/v1/usage", key=keys["usage:write"], body=charge(), QUERY_STRING="x=1"),
    lambda keys: environ("POST", "/api/v1/usage", key=keys["usage:write"], body=charge(), HTTP_HOST="evil.test"),
    lambda keys: environ("POST", "/api/v1/usage", key=keys["usage:write"], body=charge(), HTTP_ACCEPT="text/html"),
    lambda keys: environ("GET", "/api/v1/usage", key=keys["usage:write"]),  # 405
    lambda keys: environ("GET", "/api/v1/customers/acme/eu/ledger", key=keys["balance:read"]),
])
def test_everything_else_is_django_s_answer(acme, keys, make_env):
    hot, django = both(lambda: make_env(keys), False)
    assert hot == django
    assert UsageEvent.objects.filter(status="charged").count() <= 1
