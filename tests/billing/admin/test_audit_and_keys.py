"""Admin changes leave an audit trail (old → new) shown on the object's page;
support edits contact fields only; API keys are shown once and revocable."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from billing.models import ApiKey, AuditEvent, CreditPack, Customer, Feature, FeatureCost, Wallet
from billing.services.api_keys import api_key_verify
from tests.factories import make_customer

pytestmark = pytest.mark.django_db


def audit_for(obj):
    return AuditEvent.objects.filter(object_type=obj._meta.label_lower, object_id=str(obj.pk)).order_by("-pk")


def inline_data(client, url) -> dict:
    """The management forms and current rows of whatever inlines the page has
    (other apps add theirs to billing pages), as a browser would post them back."""
    response = client.get(url)
    data = {}
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        for key, value in formset.management_form.initial.items():
            data[f"{formset.prefix}-{key}"] = value
        for form in formset.forms:
            for name in form.fields:
                value = form[name].value()
                if value is not None:
                    data[form.add_prefix(name)] = value.pk if hasattr(value, "pk") else value
    return data


def customer_form(client, customer, **changes):
    url = reverse("admin:billing_customer_change", args=[customer.pk])
    data = {**inline_data(client, url), "name": customer.name, "email": customer.email,
            "timezone": customer.timezone, "currency": customer.currency, "metadata": "{}"}
    data.update(changes)
    return data


def test_finance_edit_of_a_customer_is_audited_old_to_new(staff_client):
    client = staff_client("finance")
    customer = make_customer("audited", email="old@example.com")
    url = reverse("admin:billing_customer_change", args=[customer.pk])
    response = client.post(url, customer_form(client, customer, email="new@example.com"))
    assert response.status_code == 302
    event = audit_for(customer).first()
    assert event.action == "customer.admin_change" and event.actor == client.user
    assert event.changes == {"email": "old@example.com → new@example.com"}
    page = client.get(url).content.decode()
    assert 'id="audit-history"' in page and "old@example.com → new@example.com" in page


def test_support_edits_contact_fields_only(staff_client):
    client = staff_client("support")
    customer = make_customer("supported", email="a@example.com")
    response = client.post(reverse("admin:billing_customer_change", args=[customer.pk]),
                           customer_form(client, customer, email="b@example.com", currency="EUR", name="Renamed"))
    assert response.status_code == 302
    customer.refresh_from_db()
    assert (customer.email, customer.name, customer.currency) == ("b@example.com", "Renamed", "USD")
    assert set(audit_for(customer).first().changes) == {"email", "name"}


def test_finance_adds_a_customer_with_its_default_wallet(staff_client):
    client = staff_client("finance")
    response = client.post(reverse("admin:billing_customer_add"), {
        "external_id": "new-co", "name": "New Co", "email": "", "currency": "EUR", "timezone": "Europe/Paris",
        "policy": "overdraft", "credit_limit": "500"})
    assert response.status_code == 302
    customer = Customer.objects.get(external_id="new-co")
    wallet = Wallet.objects.get(customer=customer, is_default=True)
    assert (wallet.policy, wallet.credit_limit) == ("overdraft", Decimal("500"))
    assert audit_for(customer).filter(action="customer.create", actor=client.user).exists()
    duplicate = client.post(reverse("admin:billing_customer_add"), {
        "external_id": "new-co", "name": "Again", "currency": "EUR", "timezone": "UTC", "policy": "block",
        "credit_limit": "0"})
    assert duplicate.status_code == 200 and "external_id" in duplicate.context["adminform"].form.errors


def test_wallet_settings_change_is_audited_and_keeps_the_balance(staff_client):
    client = staff_client("finance")
    customer = make_customer("walleted")
    wallet = Wallet.objects.get(customer=customer)
    Wallet.objects.filter(pk=wallet.pk).update(ledger_balance=Decimal("42"))  # as if charged meanwhile
    url = reverse("admin:billing_wallet_change", args=[wallet.pk])
    response = client.post(url, {**inline_data(client, url), "name": "Team pool", "policy": "overdraft",
                                 "credit_limit": "100"})
    assert response.status_code == 302, response.context["errors"]
    wallet.refresh_from_db()
    assert (wallet.name, wallet.policy, wallet.ledger_balance) == ("Team pool", "overdraft", Decimal("42"))
    assert audit_for(wallet).first().changes["policy"] == "block → overdraft"


def test_pack_feature_and_cost_changes_are_audited(staff_client):
    client = staff_client("finance")
    response = client.post(reverse("admin:billing_creditpack_add"), {
        "code": "pro", "name": "Pro", "kind": "prepaid", "credits": "10000", "price": "900", "currency": "USD",
        "validity_days": "365", "priority": "50", "active": "on",
        "tiers-TOTAL_FORMS": "1", "tiers-INITIAL_FORMS": "0", "tiers-MIN_NUM_FORMS": "0",
        "tiers-MAX_NUM_FORMS": "1000", "tiers-0-min_quantity": "10", "tiers-0-discount_percent": "15"})
    assert response.status_code == 302
    pack = CreditPack.objects.get(code="pro")
    event = audit_for(pack).get()
    assert event.action == "creditpack.admin_add" and "tiers" in "".join(event.changes)
    assert "10+ packs: 15.00% off" in client.get(reverse("admin:billing_creditpack_change", args=[pack.pk])).content.decode()

    client.post(reverse("admin:billing_feature_add"), {"key": "gpu-minute", "name": "GPU minute", "unit": "minute",
                                                       "active": "on", "costs-TOTAL_FORMS": "0",
                                                       "costs-INITIAL_FORMS": "0"})
    feature = Feature.objects.get(key="gpu-minute")
    assert audit_for(feature).filter(action="feature.admin_add").exists()
    cost = client.post(reverse("admin:billing_featurecost_add"), {
        "feature": feature.pk, "credits_per_unit": "3.5", "effective_from_0": "2026-01-01",
        "effective_from_1": "00:00:00", "note": "launch price"})
    assert cost.status_code == 302
    version = FeatureCost.objects.get(feature=feature)
    assert version.created_by == client.user
    assert audit_for(version).filter(action="featurecost.admin_add").exists()


def test_api_key_is_shown_once_and_can_be_revoked(staff_client):
    client = staff_client("finance")
    response = client.post(reverse("admin:billing_apikey_add"), {"name": "backend", "scopes": ["usage:write",
                                                                                                 "balance:read"]},
                           follow=True)
    texts = [str(m) for m in get_messages(response.wsgi_request)] or [
        str(m) for m in response.context["messages"]]
    raw = re.search(r"cdk_\S+", " ".join(texts)).group(0)
    key = ApiKey.objects.get(name="backend")
    assert key.scopes == ["usage:write", "balance:read"]
    assert api_key_verify(raw) is not None
    assert raw not in client.get(reverse("admin:billing_apikey_change", args=[key.pk])).content.decode()
    bad = client.post(reverse("admin:billing_apikey_add"), {"name": "x", "scopes": ["root"]})
    assert bad.status_code == 200 and bad.context["adminform"].form.errors
    client.post(reverse("admin:billing_apikey_changelist"),
                {"action": "revoke_selected", "_selected_action": [key.pk], "index": 0})
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert api_key_verify(raw) is None


def test_audit_events_are_read_only_and_filterable(staff_client):
    client = staff_client("auditor")
    make_customer("trail")
    event = AuditEvent.objects.first()
    changelist = reverse("admin:billing_auditevent_changelist")
    assert client.get(changelist, {"object_type": "billing.customer"}).status_code == 200
    assert client.post(reverse("admin:billing_auditevent_change", args=[event.pk]), {}).status_code == 403
    superuser = staff_client("superuser", "root")
    assert superuser.post(reverse("admin:billing_auditevent_delete", args=[event.pk]), {"post": "yes"}
                          ).status_code == 403
    assert AuditEvent.objects.filter(pk=event.pk).exists()
