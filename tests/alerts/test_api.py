"""Alerts API: read and set a customer's rules and auto top-up; list webhook deliveries."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.utils import timezone

from alerts.models import AlertRule, AutoTopUp, Notification, NotificationAttempt, Severity, WebhookEndpoint
from billing.services.grants import default_wallet
from tests.alerts.conftest import make_rule
from tests.billing.api.conftest import assert_error, make_api
from tests.factories import CreditPackFactory, grant, make_customer

pytestmark = pytest.mark.django_db


@pytest.fixture
def customer():
    customer = make_customer("acme", email="ap@acme.test")
    grant(default_wallet(customer), 500)
    return customer


def test_rules_show_the_global_default_then_the_override(customer):
    make_rule((100, Severity.WARNING), name="Global default")
    admin, reader = make_api("admin"), make_api("balance:read")

    status, body = reader.get("/api/v1/alerts/customers/acme/rules")
    assert status == 200
    assert body["effective_rule"]["name"] == "Global default" and body["override"] is None
    assert body["effective_rule"]["levels"] == [{"kind": "absolute", "value": "100.000000", "severity": "warning"}]

    assert_error(reader._send("put", "/api/v1/alerts/customers/acme/rules", {"levels": []}), 403, "forbidden")
    status, body = admin._send("put", "/api/v1/alerts/customers/acme/rules", {
        "levels": [{"kind": "percent", "value": "20", "severity": "warning"},
                   {"kind": "absolute", "value": 0, "severity": "critical"},
                   {"kind": "days_left", "value": "3", "severity": "info"}],
        "min_interval_seconds": 3600, "channels": {"sms": True}, "recipients": {"finance": True},
        "hysteresis_percent": "5",
    })
    assert status == 200, body
    rule = body["effective_rule"]
    assert rule["scope"] == "customer" and body["override"]["id"] == rule["id"]
    assert rule["min_interval_seconds"] == 3600 and rule["channels"] == {"email": True, "sms": True, "webhook": True}
    assert rule["recipients"]["finance"] is True and rule["hysteresis_percent"] == "5.00"
    assert len(rule["levels"]) == 3
    assert AlertRule.objects.get(scope="customer").levels.count() == 3


def test_rule_validation_names_the_field(customer):
    admin = make_api("admin")
    assert_error(admin._send("put", "/api/v1/alerts/customers/acme/rules",
                             {"levels": [{"kind": "percent", "value": "120", "severity": "warning"}]}),
                 400, "invalid_request", "levels.0")
    assert_error(admin._send("put", "/api/v1/alerts/customers/acme/rules",
                             {"levels": [{"kind": "absolute", "value": "-1", "severity": "warning"}]}),
                 400, "invalid_request", "levels.0.value")
    assert_error(admin._send("put", "/api/v1/alerts/customers/acme/rules",
                             {"levels": [{"kind": "absolute", "value": "5", "severity": "warning"},
                                         {"kind": "absolute", "value": "5.0", "severity": "critical"}]}),
                 400, "invalid_request", "levels.1")
    assert_error(admin._send("put", "/api/v1/alerts/customers/nobody/rules", {}), 404, "not_found")


def test_auto_top_up_set_and_read(customer):
    CreditPackFactory(code="refill", credits=Decimal("1000"), price=Decimal("90.00"))
    admin = make_api("admin")
    assert make_api("balance:read").get("/api/v1/alerts/customers/acme/auto-top-up") == (
        200, {"customer": "acme", "auto_top_up": None})
    assert_error(admin._send("put", "/api/v1/alerts/customers/acme/auto-top-up", {"threshold": "10"}),
                 400, "invalid_request", "pack")
    assert_error(admin._send("put", "/api/v1/alerts/customers/acme/auto-top-up",
                             {"threshold": "10", "pack": "nope"}), 404, "not_found", "pack")
    assert_error(admin._send("put", "/api/v1/alerts/customers/acme/auto-top-up",
                             {"threshold": "100", "pack": "refill", "mode": "target", "target_balance": "50"}),
                 400, "invalid_request", "target_balance")

    status, body = admin._send("put", "/api/v1/alerts/customers/acme/auto-top-up", {
        "threshold": "100", "pack": "refill", "cooldown_seconds": 600, "monthly_max_count": 4,
        "monthly_max_credits": 5000})
    assert status == 200, body
    settings = body["auto_top_up"]
    assert settings["threshold"] == "100.000000" and settings["pack"] == "refill"
    assert settings["cooldown_seconds"] == 600 and settings["monthly_max_credits"] == "5000.000000"
    assert settings["recent_runs"] == []
    wallet = default_wallet(customer)
    wallet.refresh_from_db()
    assert wallet.alert_below == Decimal("100.000001")  # billing now watches the threshold

    status, body = admin._send("put", "/api/v1/alerts/customers/acme/auto-top-up", {"enabled": False})
    assert status == 200 and body["auto_top_up"]["enabled"] is False
    assert AutoTopUp.objects.get().threshold == Decimal("100")


def test_webhook_deliveries_list_with_attempts_and_cursor(customer):
    endpoint = WebhookEndpoint.objects.create(url="http://127.0.0.1:9/h", event_types=["wallet.paused"])
    other = make_customer("globex")
    for i in range(3):
        n = Notification.objects.create(event_type="wallet.paused", channel="webhook", customer=customer,
                                        recipient=endpoint.url, endpoint=endpoint, dedupe_key=f"k{i}",
                                        message_id=f"msg_{i}", status="sent", attempts=1)
        NotificationAttempt.objects.create(notification=n, ok=True, status_code=200, latency_ms=12,
                                           response_excerpt="ok", attempted_at=timezone.now())
    Notification.objects.create(event_type="wallet.paused", channel="webhook", customer=other, recipient=endpoint.url,
                                endpoint=endpoint, dedupe_key="other", message_id="msg_o", status="failed")
    reader = make_api("balance:read")

    status, body = reader.get("/api/v1/alerts/webhook-deliveries?customer=acme&limit=2")
    assert status == 200
    assert [d["message_id"] for d in body["results"]] == ["msg_2", "msg_1"]
    assert body["results"][0]["attempt_log"][0] == {
        "attempted_at": body["results"][0]["attempt_log"][0]["attempted_at"], "ok": True, "status_code": 200,
        "latency_ms": 12, "response_excerpt": "ok", "error": ""}
    status, body = reader.get(f"/api/v1/alerts/webhook-deliveries?customer=acme&limit=2&cursor={body['next_cursor']}")
    assert [d["message_id"] for d in body["results"]] == ["msg_0"] and body["next_cursor"] is None
    status, body = reader.get("/api/v1/alerts/webhook-deliveries?status=failed")
    assert [d["customer"] for d in body["results"]] == ["globex"]
    assert_error(reader.get("/api/v1/alerts/webhook-deliveries?status=nope"), 400, "invalid_request", "status")
    assert_error(make_api("usage:write").get("/api/v1/alerts/webhook-deliveries"), 403, "forbidden")
    assert_error(reader.get("/api/v1/alerts/webhook-deliveries?cursor=zzz"), 400, "invalid_request", "cursor")
