"""The alerts demo (README, "Watch the alerts"): after ``seed_demo`` and
``seed_alerts_demo``, draining Pixel Forge through the usage API sends the
low-balance email, delivers signed webhooks to the demo receiver inside
Creditdesk, buys the auto top-up and sends the recovered notice. And the demo
receiver itself: Standard Webhooks signatures in, 204 or 401 out."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone
from standardwebhooks import Webhook

from alerts.models import AutoTopUpRun, EventType, Notification, NotificationAttempt, WebhookEndpoint
from alerts.services.notifications import webhook_endpoint_rotate_secret
from billing.management.commands.seed_demo import DEMO_API_KEY
from billing.models import CreditGrant, Customer, PackPurchase
from billing.selectors import wallet_balance
from billing.services.grants import default_wallet

# README's drain: 200 images at 50 credits each.
DRAIN = {"customer": "pixelforge", "feature": "image-generation", "quantity": "200"}
DRAIN_CREDITS = Decimal("10000")


@pytest.mark.django_db(transaction=True)
def test_draining_pixel_forge_through_the_api_tells_the_whole_story(client, live_server, mailoutbox):
    call_command("seed_demo", stdout=StringIO())
    out = StringIO()
    call_command("seed_alerts_demo", url=live_server.url, stdout=out)
    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.url == f"{live_server.url}/alerts/demo-receiver/{endpoint.pk}"
    assert endpoint.url in out.getvalue()

    pixel = Customer.objects.get(external_id="pixelforge")
    wallet = default_wallet(pixel)
    before = wallet_balance(wallet).available
    # README's numbers hold: the drain lands under the 20 % level (of 30,000 granted in
    # 30 days) and the 5,000 top-up threshold, above the 10 % level.
    assert Decimal("3000") < before - DRAIN_CREDITS <= Decimal("5000"), before
    mailoutbox.clear()
    sent_before = set(Notification.objects.values_list("pk", flat=True))

    response = client.post("/api/v1/usage", {**DRAIN, "event_id": f"demo-drain-{uuid.uuid4().hex[:8]}"},
                           content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {DEMO_API_KEY}")
    assert response.status_code == 201, response.content

    # The low-balance email, to Pixel Forge's billing contact, naming balance and threshold.
    low = [m for m in mailoutbox if "credits running low" in m.subject]
    assert low and low[0].subject.startswith("Pixel Forge: credits running low"), [m.subject for m in mailoutbox]
    assert "billing@pixelforge.example" in {m.to[0] for m in low}
    assert "Threshold: 6000.000000 credits" in low[0].body and "Burn rate:" in low[0].body

    # The auto top-up: one Starter 10K purchase whose grant came from auto top-up.
    run = AutoTopUpRun.objects.get(wallet=wallet)
    assert run.status == AutoTopUpRun.Status.SUCCEEDED
    purchase = PackPurchase.objects.get(pk=run.purchase_id)
    assert purchase.pack.code == "starter-10k" and purchase.wallet == wallet
    assert purchase.grant.source == CreditGrant.Source.AUTO_TOP_UP
    assert purchase.grant.status == CreditGrant.Status.ACTIVE
    assert wallet_balance(wallet).available == before - DRAIN_CREDITS + Decimal("10000")

    # The recovered notice, by email and webhook.
    assert any("back above" in m.subject for m in mailoutbox), [m.subject for m in mailoutbox]

    # Signed webhooks, verified by the demo receiver (204) and logged with their attempts.
    new = Notification.objects.filter(channel=Notification.Channel.WEBHOOK, endpoint=endpoint).exclude(
        pk__in=sent_before)
    delivered = {n.event_type: n for n in new}
    for event in (EventType.BALANCE_LOW, EventType.TOPPED_UP, EventType.BALANCE_RECOVERED):
        notification = delivered[event]
        assert notification.status == Notification.Status.SENT, (event, notification.last_error)
        attempt = NotificationAttempt.objects.get(notification=notification)
        assert attempt.ok and attempt.status_code == 204
    assert not Notification.objects.filter(status=Notification.Status.FAILED).exists()

    # Draining again within the hour: the cooldown holds the next top-up back.
    response = client.post("/api/v1/usage", {**DRAIN, "event_id": f"demo-drain-{uuid.uuid4().hex[:8]}"},
                           content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {DEMO_API_KEY}")
    assert response.status_code == 201, response.content
    second = AutoTopUpRun.objects.filter(wallet=wallet).order_by("-pk").first()
    assert second != run and second.status == AutoTopUpRun.Status.SKIPPED and "Cooldown" in second.detail
    assert PackPurchase.objects.filter(wallet=wallet, grant__source=CreditGrant.Source.AUTO_TOP_UP).count() == 1


def _signed(endpoint: WebhookEndpoint, *, secret: str | None = None, body: dict | None = None,
            at=None) -> tuple[str, dict]:
    payload = json.dumps(body or {"type": "wallet.balance_low", "data": {"customer": "pixelforge"}})
    msg_id = f"msg_{uuid.uuid4().hex}"
    at = at or timezone.now()
    signature = Webhook(secret or endpoint.secret).sign(msg_id, at, payload)
    headers = {"HTTP_WEBHOOK_ID": msg_id, "HTTP_WEBHOOK_TIMESTAMP": str(int(at.timestamp())),
               "HTTP_WEBHOOK_SIGNATURE": signature}
    return payload, headers


@pytest.fixture
def endpoint(db):
    return WebhookEndpoint.objects.create(url="http://127.0.0.1:8000/alerts/demo-receiver/1",
                                          event_types=["wallet.balance_low"])


def _post(client, endpoint, payload, headers):
    return client.post(f"/alerts/demo-receiver/{endpoint.pk}", payload, content_type="application/json", **headers)


def test_receiver_accepts_a_standard_webhooks_signature(client, endpoint):
    payload, headers = _signed(endpoint)
    assert _post(client, endpoint, payload, headers).status_code == 204


def test_receiver_refuses_a_wrong_secret_a_changed_body_or_a_stale_timestamp(client, endpoint):
    other = WebhookEndpoint.objects.create(url="http://x.test/", event_types=[])
    payload, headers = _signed(endpoint, secret=other.secret)
    assert _post(client, endpoint, payload, headers).status_code == 401
    payload, headers = _signed(endpoint)
    assert _post(client, endpoint, payload.replace("pixelforge", "acme"), headers).status_code == 401
    payload, headers = _signed(endpoint, at=timezone.now() - timedelta(minutes=10))
    assert _post(client, endpoint, payload, headers).status_code == 401
    assert _post(client, endpoint, payload, {}).status_code == 401


def test_receiver_accepts_the_previous_secret_during_a_rotation(client, endpoint):
    old = endpoint.secret
    webhook_endpoint_rotate_secret(endpoint_id=endpoint.pk)
    payload, headers = _signed(endpoint, secret=old)
    assert _post(client, endpoint, payload, headers).status_code == 204


def test_receiver_is_off_unless_enabled(client, endpoint, settings):
    settings.ALERTS_DEMO_RECEIVER = False
    settings.DEBUG = False
    payload, headers = _signed(endpoint)
    assert _post(client, endpoint, payload, headers).status_code == 404
    settings.DEBUG = True
    assert _post(client, endpoint, payload, headers).status_code == 204
