"""Changelists cost the same number of queries with 3 rows or 33: no N+1."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.models import AuditEvent
from billing.services.api_keys import api_key_create
from billing.services.grants import adjustment_request, default_wallet, grant_create
from billing.services.packs import pack_purchase
from billing.services.reservations import reservation_create
from tests.billing.admin.conftest import charge
from tests.factories import CreditPackFactory, make_customer, make_feature

pytestmark = pytest.mark.django_db

CHANGELISTS = ("customer", "wallet", "creditgrant", "ledgerentry", "usageevent", "reservation", "packpurchase",
               "adjustment", "apikey", "auditevent", "feature", "featurecost", "creditpack", "jobrun",
               "outboxevent")
MAX_QUERIES = 16


def add_rows(count: int, *, start: int, feature, pack, user) -> None:
    for i in range(start, start + count):
        customer = make_customer(f"qc-{i}")
        wallet = default_wallet(customer)
        grant_create(wallet=wallet, kind="prepaid", amount=Decimal("100"), price_paid=Decimal("10"),
                     require_approval=False, reason=f"r{i}", requested_by=user)
        charge(wallet, feature, "1", f"qc-evt-{i}")
        reservation_create(customer=customer, wallet_id=wallet.pk, amount=Decimal("1"))
        pack_purchase(wallet=wallet, pack=pack, purchased_by=user)
        adjustment_request(wallet=wallet, amount=Decimal("1"), reason="r", requested_by=user)
        api_key_create(name=f"key-{i}", scopes=["balance:read"], created_by=user)
        make_feature(f"feature-{i}", "1", customer=customer)


def measure(client) -> dict[str, int]:
    counts = {}
    for model in CHANGELISTS:
        with CaptureQueriesContext(connection) as ctx:
            response = client.get(reverse(f"admin:billing_{model}_changelist"))
        assert response.status_code == 200, model
        counts[model] = len(ctx.captured_queries)
    return counts


def test_changelists_do_not_grow_with_rows(staff_client):
    client = staff_client("superuser")
    feature = make_feature("qc-call", "1")
    pack = CreditPackFactory(code="qc-pack")
    add_rows(3, start=0, feature=feature, pack=pack, user=client.user)
    small = measure(client)
    add_rows(30, start=3, feature=feature, pack=pack, user=client.user)
    assert AuditEvent.objects.count() > 60
    big = measure(client)
    assert big == small
    assert max(big.values()) <= MAX_QUERIES, big


def test_ledger_changelist_query_bound(staff_client, django_assert_max_num_queries):
    client = staff_client("auditor")
    feature = make_feature("qc-call", "1")
    pack = CreditPackFactory(code="qc-pack")
    add_rows(30, start=0, feature=feature, pack=pack, user=client.user)
    with django_assert_max_num_queries(10):
        response = client.get(reverse("admin:billing_ledgerentry_changelist"))
    assert response.status_code == 200
    assert len(response.context["cl"].result_list) == 50
    assert "more than" not in response.content.decode()  # 90+ rows, counted exactly within the look-ahead


def test_big_ledger_is_never_counted_whole(staff_client, monkeypatch):
    from django.contrib import admin as django_admin

    from billing.models import LedgerEntry

    client = staff_client("auditor")
    feature = make_feature("qc-call", "1")
    pack = CreditPackFactory(code="qc-pack")
    add_rows(10, start=0, feature=feature, pack=pack, user=client.user)
    monkeypatch.setattr(django_admin.site._registry[LedgerEntry], "list_per_page", 2)
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(reverse("admin:billing_ledgerentry_changelist"))
    counts = [q["sql"] for q in ctx.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts and all("LIMIT 23" in sql for sql in counts), counts
    assert response.context["cl"].paginator.count_is_capped
    assert "more than 22" in response.content.decode()
    last = client.get(reverse("admin:billing_ledgerentry_changelist"), {"p": "15"})
    assert last.status_code == 200 and len(last.context["cl"].result_list) == 2
