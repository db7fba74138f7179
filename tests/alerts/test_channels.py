"""Every channel delivering for real: Django's locmem outbox, Twilio's API
stood in for on 127.0.0.1, a webhook receiver on 127.0.0.1 verifying Standard
Webhooks signatures; retries with backoff, disabling after failures and on 410."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone
from standardwebhooks import Webhook

from alerts.models import AlertsProfile, Notification, NotificationAttempt, Severity, WebhookEndpoint
from alerts.services.notifications import (
    notification_deliver,
    notification_replay,
    notify,
    webhook_endpoint_rotate_secret,
)
from billing.services.grants import default_wallet
from tests.alerts.conftest import charge, make_rule
from tests.factories import UserFactory, grant, make_customer, make_feature

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def feature():
    return make_feature("api-call", "1")


def endpoint_for(url, *types, customer=None) -> WebhookEndpoint:
    return WebhookEndpoint.objects.create(url=url, event_types=list(types or ["wallet.balance_low"]),
                                          customer=customer)


def finance_user(email="finance@creditdesk.test"):
    user = UserFactory(username="fin", email=email)
    user.groups.add(Group.objects.get(name="Finance"))
    return user


def test_signed_webhook_verifies_with_standardwebhooks(feature, webhook_receiver):
    make_rule((50, Severity.WARNING))
    endpoint = endpoint_for(webhook_receiver.url, "wallet.balance_low", "wallet.topped_up")
    customer = make_customer(email="b@acme.test")
    grant(default_wallet(customer), 100)

    charge(customer, feature, 70)

    low = [r for r in webhook_receiver.requests if json.loads(r["body"])["type"] == "wallet.balance_low"]
    assert len(low) == 1
    request = low[0]
    body = Webhook(endpoint.secret).verify(request["body"], request["headers"])
    assert body["data"]["available"] == "30.000000"
    assert body["data"]["customer"] == customer.external_id
    assert body["data"]["threshold"] == "50.000000"
    assert request["headers"]["webhook-id"].startswith("msg_")
    with pytest.raises(Exception):  # noqa: B017 - any verification error
        Webhook("whsec_" + "QUJD" * 8).verify(request["body"], request["headers"])
    delivery = Notification.objects.get(channel="webhook", event_type="wallet.balance_low")
    assert delivery.status == Notification.Status.SENT
    attempt = delivery.attempt_log.get()
    assert attempt.status_code == 200 and attempt.ok and '"ok": true' in attempt.response_excerpt


def test_secret_rotation_signs_with_old_and_new(webhook_receiver):
    customer = make_customer()
    endpoint = endpoint_for(webhook_receiver.url, "wallet.paused", customer=customer)
    old_secret = endpoint.secret
    endpoint = webhook_endpoint_rotate_secret(endpoint_id=endpoint.pk, overlap=timedelta(hours=1))
    now = timezone.now()
    notify(event_type="wallet.paused", customer=customer, payload={"x": 1}, dedupe="t1", now=now)

    request = webhook_receiver.requests[-1]
    assert len(request["headers"]["webhook-signature"].split(" ")) == 2
    Webhook(old_secret).verify(request["body"], request["headers"])
    Webhook(endpoint.secret).verify(request["body"], request["headers"])

    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(previous_secret_expires_at=now - timedelta(seconds=1))
    notify(event_type="wallet.paused", customer=customer, payload={"x": 2}, dedupe="t2", now=now)
    request = webhook_receiver.requests[-1]
    assert len(request["headers"]["webhook-signature"].split(" ")) == 1
    Webhook(endpoint.secret).verify(request["body"], request["headers"])


def test_sms_through_twilio_standin(feature, settings, twilio_standin):
    settings.ALERTS_SMS_BACKEND = "twilio"
    settings.TWILIO_ACCOUNT_SID = "ACtest"
    settings.TWILIO_AUTH_TOKEN = "secret-token"
    settings.TWILIO_FROM_NUMBER = "+15005550006"
    settings.TWILIO_API_BASE_URL = twilio_standin.url
    make_rule((50, Severity.CRITICAL), sms=True, email=False, webhook=False)
    customer = make_customer()
    AlertsProfile.objects.create(customer=customer, billing_phone="+14155550100")
    grant(default_wallet(customer), 100)

    charge(customer, feature, 60)

    assert len(twilio_standin.requests) == 1
    sent = twilio_standin.requests[0]
    assert sent["path"] == "/2010-04-01/Accounts/ACtest/Messages.json"
    assert sent["auth"] == "ACtest:secret-token"
    assert sent["form"]["To"] == "+14155550100" and sent["form"]["From"] == "+15005550006"
    assert "credits running low (40.000000 left)" in sent["form"]["Body"]
    sms = Notification.objects.get(channel="sms")
    assert sms.status == Notification.Status.SENT and sms.message_id.startswith("SM")


def test_twilio_error_is_logged_and_not_retried_when_permanent(settings, twilio_standin):
    settings.ALERTS_SMS_BACKEND = "twilio"
    settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN = "ACtest", "t"
    settings.TWILIO_FROM_NUMBER, settings.TWILIO_API_BASE_URL = "+15005550006", twilio_standin.url
    twilio_standin.responses = [(400, json.dumps({"code": 21211, "message": "Invalid 'To' Phone Number",
                                                  "status": 400}))]
    customer = make_customer()
    AlertsProfile.objects.create(customer=customer, billing_phone="+1000")
    rule = make_rule((10, Severity.INFO), sms=True, email=False, webhook=False)
    notify(event_type="wallet.balance_low", customer=customer, rule=rule, payload={}, dedupe="sms-bad",
           now=timezone.now())
    sms = Notification.objects.get(channel="sms")
    assert sms.status == Notification.Status.FAILED and sms.attempts == 1
    assert sms.attempt_log.get().status_code == 400


def test_console_sms_backend(settings, capsys):
    settings.ALERTS_SMS_BACKEND = "console"
    customer = make_customer()
    AlertsProfile.objects.create(customer=customer, billing_phone="+14155550100")
    rule = make_rule((10, Severity.INFO), sms=True, email=False, webhook=False)
    notify(event_type="wallet.balance_low", customer=customer, rule=rule, payload={"available": "3"},
           dedupe="console", now=timezone.now())
    assert "[sms to +14155550100] Creditdesk:" in capsys.readouterr().out


def test_retries_with_exponential_backoff_until_success(webhook_receiver, settings):
    settings.ALERTS_RETRY_BASE_SECONDS = 30
    webhook_receiver.responses = [(500, "boom"), (503, "busy")]
    customer = make_customer()
    endpoint_for(webhook_receiver.url, "wallet.paused")
    notify(event_type="wallet.paused", customer=customer, payload={"n": 1}, dedupe="r1", now=timezone.now())

    delivery = Notification.objects.get(channel="webhook")
    assert delivery.status == Notification.Status.SENT and delivery.attempts == 3
    attempts = list(delivery.attempt_log.order_by("pk"))
    assert [a.status_code for a in attempts] == [500, 503, 200]
    assert [a.retry_in_seconds for a in attempts] == [30, 60, None]
    assert attempts[0].response_excerpt == "boom"
    ids = {r["headers"]["webhook-id"] for r in webhook_receiver.requests}
    assert ids == {delivery.message_id}  # the same message id on every retry


def test_retry_not_due_is_skipped_by_others(webhook_receiver):
    webhook_receiver.default = (500, "down")
    customer = make_customer()
    endpoint_for(webhook_receiver.url, "wallet.paused")
    delivery = Notification.objects.create(
        event_type="wallet.paused", channel="webhook", customer=customer, recipient=webhook_receiver.url,
        endpoint=WebhookEndpoint.objects.get(), dedupe_key="manual", message_id="msg_manual")
    now = timezone.now()
    first = notification_deliver(notification_id=delivery.pk, now=now)
    assert (first.outcome, first.retry_in) == ("retry", 30)
    again = notification_deliver(notification_id=delivery.pk, now=now + timedelta(seconds=10))
    assert again.outcome == "skipped" and len(webhook_receiver.requests) == 1
    due = notification_deliver(notification_id=delivery.pk, now=now + timedelta(seconds=31))
    assert (due.outcome, due.retry_in) == ("retry", 60)


def test_endpoint_disabled_after_consecutive_failures_and_finance_told(webhook_receiver, settings, mailoutbox):
    settings.ALERTS_WEBHOOK_DISABLE_AFTER = 3
    finance_user()
    webhook_receiver.default = (500, "down")
    customer = make_customer()
    endpoint = endpoint_for(webhook_receiver.url, "wallet.paused")
    notify(event_type="wallet.paused", customer=customer, payload={}, dedupe="d1", now=timezone.now())

    endpoint.refresh_from_db()
    assert not endpoint.enabled and "3 consecutive" in endpoint.disabled_reason
    delivery = Notification.objects.get(channel="webhook")
    assert delivery.status == Notification.Status.FAILED and delivery.attempts == 3
    notices = [m for m in mailoutbox if "Webhook endpoint disabled" in m.subject]
    assert len(notices) == 1 and notices[0].to == ["finance@creditdesk.test"]

    notify(event_type="wallet.paused", customer=customer, payload={}, dedupe="d2", now=timezone.now())
    assert len(webhook_receiver.requests) == 3  # a disabled endpoint gets nothing more


def test_410_disables_at_once_and_replay_after_enable(webhook_receiver, mailoutbox):
    finance_user()
    webhook_receiver.responses = [(410, "gone")]
    customer = make_customer()
    endpoint = endpoint_for(webhook_receiver.url, "wallet.paused")
    notify(event_type="wallet.paused", customer=customer, payload={}, dedupe="g1", now=timezone.now())
    endpoint.refresh_from_db()
    delivery = Notification.objects.get(channel="webhook")
    assert not endpoint.enabled and "410" in endpoint.disabled_reason
    assert delivery.status == Notification.Status.FAILED and delivery.attempts == 1
    assert any("Webhook endpoint disabled" in m.subject for m in mailoutbox)

    from alerts.services.notifications import webhook_endpoint_enable

    webhook_endpoint_enable(endpoint_id=endpoint.pk)
    notification_replay(notification_id=delivery.pk)
    delivery.refresh_from_db()
    assert delivery.status == Notification.Status.SENT
    assert NotificationAttempt.objects.filter(notification=delivery).count() == 2
    assert webhook_receiver.requests[-1]["headers"]["webhook-id"] == delivery.message_id


def test_email_to_contacts_and_account_owner(feature, mailoutbox):
    owner = UserFactory(username="owner", email="owner@creditdesk.test")
    make_rule((50, Severity.WARNING), notify_technical_contact=True)
    customer = make_customer(email="fallback@acme.test")
    AlertsProfile.objects.create(customer=customer, billing_email="ap@acme.test", technical_email="ops@acme.test",
                                 account_owner=owner)
    grant(default_wallet(customer), Decimal(100))
    charge(customer, feature, 60)
    to = sorted(m.to[0] for m in mailoutbox if "running low" in m.subject)
    assert to == ["ap@acme.test", "ops@acme.test", "owner@creditdesk.test"]
