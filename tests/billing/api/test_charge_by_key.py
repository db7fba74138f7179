"""``POST /usage`` resolves and charges in one statement (``creditdesk_usage_charge_by_key``,
billing/services/charge_by_key.py). Each scenario is played twice on the same data — once on
that path, once with the database paths off (the Python engine and the ordinary resolve) — and
the answers must be byte for byte the same; and the one-statement path never acts on a stale
resolution."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import transaction
from django.test import Client
from django.utils import timezone

from billing.models import Feature, LedgerEntry, UsageEvent, Wallet
from billing.services import usage
from billing.services.api_keys import api_key_create
from billing.services.wallets import wallet_pause
from tests.factories import funded_wallet, grant, make_feature

pytestmark = pytest.mark.django_db


@pytest.fixture
def client(db):
    _, raw_key = api_key_create(name="by-key", scopes=["usage:write", "balance:read"])
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw_key}")


def body(customer="acme", feature="api-call", quantity="3", event_id="e1", **extra) -> str:
    return json.dumps({"customer": customer, "feature": feature, "quantity": quantity, "event_id": event_id,
                       **extra})


def played_both_ways(client, monkeypatch, requests: list[str]) -> list[tuple[int, bytes]]:
    """The answers on the one-statement path; asserts the Python engine gives the same ones."""
    answers = {}
    for fast in (True, False):
        savepoint = transaction.savepoint()
        monkeypatch.setattr(usage, "FAST_PATH", fast)
        answers[fast] = []
        for request in requests:
            response = client.post("/api/v1/usage", request, content_type="application/json")
            answers[fast].append((response.status_code, response.content))
        answers[fast].append(("entries", list(LedgerEntry.objects.order_by("wallet_id", "sequence").values_list(
            "wallet_id", "sequence", "grant_id", "type", "amount", "balance_after"))))
        transaction.savepoint_rollback(savepoint)
    assert answers[True] == answers[False]
    return answers[True][:-1]


@pytest.fixture
def acme(db):
    wallet = funded_wallet("10")
    wallet.customer.external_id = "acme"
    wallet.customer.save(update_fields=["external_id"])
    make_feature("api-call", "2")
    return wallet


def test_charges_replays_conflicts_and_refusals_match_the_python_engine(client, monkeypatch, acme):
    answers = played_both_ways(client, monkeypatch, [
        body(event_id="e1"),                       # 201
        body(event_id="e1"),                       # replay
        body(event_id="e1", quantity="1"),         # 409 conflict
        body(event_id="e2", quantity="10"),        # 402: 20 credits, 4 left
        body(event_id="e2", quantity="10"),        # replay of the rejection
        body(customer="nobody", event_id="e3"),    # 404 customer
        body(feature="nope", event_id="e4"),       # 404 feature
        body(quantity="0", event_id="e5"),         # 400 zero not allowed
        body(event_id="e6", occurred_at=(timezone.now() - timedelta(days=400)).isoformat()),  # 400 window
        body(event_id="e7", quantity="1", occurred_at=(timezone.now() - timedelta(minutes=5)).isoformat(),
             properties={"team": "ml", "n": 1.5}),  # 201 with occurred_at and properties
        body(customer="nobody", event_id="e8", occurred_at=(timezone.now() - timedelta(days=400)).isoformat()),
    ])
    assert [status for status, _ in answers] == [201, 201, 409, 402, 402, 404, 404, 400, 400, 201, 404]


def test_several_grants_overdraft_and_a_paused_wallet_match(client, monkeypatch, db):
    wallet = funded_wallet("5", policy=Wallet.Policy.OVERDRAFT, credit_limit="20")
    wallet.customer.external_id = "acme"
    wallet.customer.save(update_fields=["external_id"])
    grant(wallet, "3", kind="promotional", expires_at=timezone.now() + timedelta(days=3))
    make_feature("api-call", "2")
    answers = played_both_ways(client, monkeypatch, [body(event_id=f"e{n}", quantity="4") for n in range(5)])
    assert [status for status, _ in answers] == [201, 201, 201, 402, 402]
    paused = funded_wallet("5")
    paused.customer.external_id = "paused"
    paused.customer.save(update_fields=["external_id"])
    wallet_pause(wallet_id=paused.pk, reason="test")
    answers = played_both_ways(client, monkeypatch, [body(customer="paused", event_id="p1")])
    assert answers[0][0] == 402 and json.loads(answers[0][1])["error"]["details"]["reason"] == "wallet_paused"


def test_a_deactivated_feature_or_moved_default_wallet_is_seen_at_once(client, acme):
    assert client.post("/api/v1/usage", body(event_id="a1"), content_type="application/json").status_code == 201
    # Changed behind the ORM's back (no signal clears any cache): the next charge must see it.
    Feature.objects.filter(key="api-call").update(active=False)
    refused = client.post("/api/v1/usage", body(event_id="a2"), content_type="application/json")
    assert refused.status_code == 404 and refused.json()["error"]["details"] == {"feature": "not found"}
    Feature.objects.filter(key="api-call").update(active=True)
    other = Wallet.objects.create(customer=acme.customer, is_default=False)
    Wallet.objects.filter(pk=acme.pk).update(is_default=False)
    Wallet.objects.filter(pk=other.pk).update(is_default=True)
    answer = client.post("/api/v1/usage", body(event_id="a3", quantity="0.5"), content_type="application/json")
    assert answer.status_code == 402  # the new default wallet holds nothing
    assert UsageEvent.objects.get(event_id="a3").wallet_id == other.pk
