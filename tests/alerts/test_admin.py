"""The alerts admin: every page renders for finance, support reads only, the
replay action and finance's approval queue work through the services."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from alerts.models import (
    AlertRule,
    AlertsProfile,
    AlertState,
    AutoTopUp,
    AutoTopUpRun,
    Notification,
    Severity,
    WebhookEndpoint,
)
from alerts.services.auto_top_up import auto_top_up_set
from billing import roles
from billing.models import CreditGrant
from billing.selectors import wallet_balance
from billing.services.grants import default_wallet
from tests.alerts.conftest import charge, make_rule
from tests.factories import CreditPackFactory, UserFactory, grant, make_customer, make_feature

pytestmark = pytest.mark.django_db(transaction=True)


def staff(role: str, username: str):
    roles.ensure_roles()
    user = UserFactory(username=username, email=f"{username}@creditdesk.test")
    user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def book(webhook_receiver):
    feature = make_feature("api-call", "1")
    make_rule((50, Severity.WARNING), (10, Severity.CRITICAL))
    WebhookEndpoint.objects.create(url=webhook_receiver.url, event_types=["wallet.balance_low"])
    customer = make_customer("acme", email="ap@acme.test")
    AlertsProfile.objects.create(customer=customer, billing_phone="+14155550100")
    wallet = default_wallet(customer)
    grant(wallet, 100)
    pack = CreditPackFactory(code="refill", credits=Decimal("500"), price=Decimal("50.00"))
    auto_top_up_set(wallet=wallet, threshold=Decimal("20"), pack=pack, require_approval=True)
    charge(customer, feature, 85)  # 15 left: low notice, webhook, a top-up awaiting approval
    return customer, wallet


PAGES = ["alertsprofile", "alertrule", "alertstate", "notification", "webhookdelivery", "webhookendpoint",
         "autotopup", "autotopuprun", "pendingtopupapproval"]


def test_every_alerts_page_renders_for_finance(client, book):
    customer, wallet = book
    client.force_login(staff(roles.FINANCE, "fin"))
    for model in PAGES:
        response = client.get(reverse(f"admin:alerts_{model}_changelist"))
        assert response.status_code == 200, model
    objects = {"alertrule": AlertRule.objects.get(), "alertstate": AlertState.objects.first(),
               "notification": Notification.objects.first(), "webhookendpoint": WebhookEndpoint.objects.get(),
               "autotopup": AutoTopUp.objects.get(), "alertsprofile": AlertsProfile.objects.get()}
    for model, obj in objects.items():
        assert client.get(reverse(f"admin:alerts_{model}_change", args=[obj.pk])).status_code == 200, model
    page = client.get(reverse("admin:billing_wallet_change", args=[wallet.pk])).content.decode()
    assert "Edit auto top-up" in page
    assert "auto top-up history" in page.lower() and "Awaiting finance approval" in page
    queue = client.get(reverse("admin:alerts_pendingtopupapproval_changelist")).content.decode()
    assert "500.000000" in queue
    log = client.get(reverse("admin:alerts_notification_changelist") + "?channel__exact=webhook").content.decode()
    assert "wallet.balance_low" in log


def test_support_reads_but_cannot_change(client, book):
    client.force_login(staff(roles.SUPPORT, "sup"))
    assert client.get(reverse("admin:alerts_alertrule_changelist")).status_code == 200
    assert client.get(reverse("admin:alerts_alertrule_add")).status_code == 403
    rule = AlertRule.objects.get()
    response = client.post(reverse("admin:alerts_alertrule_change", args=[rule.pk]), {"name": "x"})
    assert response.status_code == 403


def test_finance_approves_a_top_up_from_the_queue(client, book):
    customer, wallet = book
    run = AutoTopUpRun.objects.get()
    client.force_login(staff(roles.FINANCE, "fin2"))
    response = client.post(reverse("admin:alerts_pendingtopupapproval_changelist"),
                           {"action": "approve_top_ups", "_selected_action": [run.pk]}, follow=True)
    assert response.status_code == 200
    run.refresh_from_db()
    assert run.status == AutoTopUpRun.Status.SUCCEEDED
    assert run.grant.status == CreditGrant.Status.ACTIVE
    assert wallet_balance(wallet).available == Decimal("515")


def test_replay_from_the_delivery_log(client, book, webhook_receiver):
    delivery = Notification.objects.get(channel="webhook")
    before = len(webhook_receiver.requests)
    client.force_login(staff(roles.FINANCE, "fin3"))
    client.post(reverse("admin:alerts_webhookdelivery_changelist"),
                {"action": "replay", "_selected_action": [delivery.pk]}, follow=True)
    assert len(webhook_receiver.requests) == before + 1
    assert webhook_receiver.requests[-1]["headers"]["webhook-id"] == delivery.message_id
    assert delivery.attempt_log.count() == 2


def test_rule_saved_in_admin_with_inline_levels(client, book):
    customer, wallet = book
    client.force_login(staff(roles.FINANCE, "fin4"))
    response = client.post(reverse("admin:alerts_alertrule_add"), {
        "name": "Acme override", "scope": "customer", "customer": customer.pk, "segment_key": "",
        "segment_value": "", "active": "on", "priority": 100, "period_days": 30, "hysteresis_percent": "10",
        "hysteresis_credits": "0", "min_interval": "24:00:00", "email": "on", "webhook": "on",
        "notify_billing_contact": "on", "pause_when_depleted": "on", "expiring_soon_days": '{"prepaid": 14}',
        "levels-TOTAL_FORMS": 1, "levels-INITIAL_FORMS": 0, "levels-MIN_NUM_FORMS": 0, "levels-MAX_NUM_FORMS": 1000,
        "levels-0-kind": "absolute", "levels-0-value": "5", "levels-0-severity": "critical",
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    rule = AlertRule.objects.get(scope="customer")
    assert [str(level.value) for level in rule.levels.all()] == ["5.000000"]
    wallet.refresh_from_db()
    assert wallet.alert_below == Decimal("5.000001")  # the customer's wallets follow the new rule


def test_notification_log_filters_by_channel_status_and_customer(client, book):
    customer, wallet = book
    other = make_customer("globex", email="ap@globex.test")
    grant(default_wallet(other), 10)
    client.force_login(staff(roles.FINANCE, "fin5"))
    url = reverse("admin:alerts_notification_changelist")
    response = client.get(url + f"?customer={customer.pk}&channel__exact=email&status__exact=sent")
    rows = list(response.context["cl"].result_list)
    assert rows and {(n.customer_id, n.channel, n.status) for n in rows} == {(customer.pk, "email", "sent")}
    assert "ap@acme.test" in response.content.decode()
    response = client.get(url + f"?customer={other.pk}")
    assert {n.customer_id for n in response.context["cl"].result_list} == {other.pk}
    assert list(client.get(url + "?channel__exact=sms").context["cl"].result_list) == []  # the rule sends no SMS


def test_auto_top_up_added_in_admin_goes_through_the_service(client):
    customer = make_customer("initech")
    wallet = default_wallet(customer)
    grant(wallet, 100)
    pack = CreditPackFactory(code="refill-admin", credits=Decimal("200"), price=Decimal("20.00"))
    client.force_login(staff(roles.FINANCE, "fin6"))
    response = client.post(reverse("admin:alerts_autotopup_add"), {
        "wallet": wallet.pk, "enabled": "on", "threshold": "150", "pack": pack.pk, "mode": "pack",
        "pack_quantity": 1, "cooldown": "01:00:00", "max_consecutive_failures": 3,
        "runs-TOTAL_FORMS": 0, "runs-INITIAL_FORMS": 0, "runs-MIN_NUM_FORMS": 0, "runs-MAX_NUM_FORMS": 0,
    })
    assert response.status_code == 302, response.content.decode()[:3000]
    # Already below the new threshold: the service evaluated the wallet and bought a pack at once.
    assert AutoTopUpRun.objects.get(wallet=wallet).status == AutoTopUpRun.Status.SUCCEEDED
    assert wallet_balance(wallet).available == Decimal("300")
