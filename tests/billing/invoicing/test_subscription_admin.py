"""Subscriptions in the admin: finance changes a plan after reading the
proration preview, cancels now; auditors read and change nothing."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.models import CreditGrant, Plan, Subscription, SubscriptionChange
from billing.services.plans import subscription_start
from tests.billing.admin.conftest import make_staff, role_groups, staff_client  # noqa: F401 - fixtures
from tests.factories import make_customer

pytestmark = pytest.mark.django_db


@pytest.fixture
def subscription(db):
    Plan.objects.create(code="team", name="Team", base_fee=Decimal("99"), included_credits=Decimal("500"))
    plan = Plan.objects.get(code="team")
    customer = make_customer("stark", name="Stark Industries", email="ap@stark.test")
    return subscription_start(customer=customer, plan=plan, start_at=timezone.now() - timedelta(days=3))


def test_finance_previews_then_confirms_a_plan_change(subscription, staff_client):  # noqa: F811
    scale = Plan.objects.create(code="scale", name="Scale", base_fee=Decimal("299"), included_credits=Decimal("2000"))
    client = staff_client("finance")
    page = client.get(reverse("admin:billing_subscription_change", args=[subscription.pk])).content.decode()
    url = reverse("admin:billing_subscription_change_plan", args=[subscription.pk])
    assert url in page and "Cancel now" in page

    preview = client.post(url, {"plan": scale.pk}).content.decode()
    assert "proration-preview" in preview and "Confirm plan change" in preview
    assert "Credit: unused Team fee" in preview and "Charge: remaining Scale fee" in preview
    assert not SubscriptionChange.objects.exists()  # a preview writes nothing

    response = client.post(url, {"plan": scale.pk, "confirm": "True"})
    assert response.status_code == 302
    change = SubscriptionChange.objects.get()
    subscription.refresh_from_db()
    assert subscription.plan == scale and change.from_plan.code == "team"
    assert change.included_grant.kind == CreditGrant.Kind.INCLUDED and change.credits_delta > 0
    page = client.get(reverse("admin:billing_subscription_change", args=[subscription.pk])).content.decode()
    assert "Scale" in page
    assert client.get(reverse("admin:billing_subscriptionchange_changelist")).status_code == 200


def test_a_refused_change_shows_the_reason_and_changes_nothing(subscription, staff_client):  # noqa: F811
    euro = Plan.objects.create(code="euro", name="Euro", currency="EUR", base_fee=Decimal("10"))
    client = staff_client("finance")
    url = reverse("admin:billing_subscription_change_plan", args=[subscription.pk])
    page = client.post(url, {"plan": euro.pk, "confirm": "True"}, follow=True).content.decode()
    assert "keeps the currency" in page
    assert not SubscriptionChange.objects.exists()


def test_finance_cancels_now_and_the_auditor_may_not(subscription, staff_client):  # noqa: F811
    auditor = staff_client("auditor", "auditor-2")
    assert auditor.get(reverse("admin:billing_subscription_change", args=[subscription.pk])).status_code == 200
    for name in ("cancel_now", "change_plan"):
        url = reverse(f"admin:billing_subscription_{name}", args=[subscription.pk])
        assert auditor.post(url, {}).status_code == 403
    client = staff_client("finance")
    url = reverse("admin:billing_subscription_cancel_now", args=[subscription.pk])
    assert client.post(url, {}).status_code == 200  # not confirmed: the page again, nothing done
    subscription.refresh_from_db()
    assert subscription.status == Subscription.Status.ACTIVE
    response = client.post(url, {"confirm": "on"})
    assert response.status_code == 302
    subscription.refresh_from_db()
    assert subscription.status == Subscription.Status.CANCELED
    invoice = subscription.periods.get(index=0).invoice
    assert 0 < invoice.total < Decimal("99")


def test_subscription_list_filters_by_customer_link_status_and_plan(subscription, staff_client):  # noqa: F811
    other = subscription_start(customer=make_customer("wayne"), plan=subscription.plan)
    client = staff_client("finance")
    url = reverse("admin:billing_subscription_changelist")
    page = client.get(f"{url}?customer__id__exact={subscription.customer_id}").content.decode()
    assert f"/admin/billing/subscription/{subscription.pk}/change/" in page
    assert f"/admin/billing/subscription/{other.pk}/change/" not in page
    assert f"/admin/billing/subscription/{other.pk}/change/" in client.get(f"{url}?status__exact=active").content.decode()
    assert client.get(f"{url}?plan__id__exact={subscription.plan_id}&q=stark").status_code == 200
