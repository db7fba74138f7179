"""Rule resolution, quiet hours and the alerts permissions of the roles."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from django.contrib.auth.models import Group

from alerts.models import AlertRule, AlertsProfile, Notification, Severity
from alerts.services.evaluation import rule_for_wallet
from alerts.services.notifications import notify, quiet_hours_end
from alerts.services.sweep import alerts_sweep
from billing import roles
from billing.services.grants import default_wallet
from tests.alerts.conftest import make_rule
from tests.factories import make_customer

pytestmark = pytest.mark.django_db


def test_customer_override_then_segment_then_global():
    global_rule = make_rule((10, Severity.INFO), name="Global")
    make_rule((10, Severity.INFO), name="Global later", priority=200)
    enterprise = make_rule((50, Severity.WARNING), name="Enterprise", scope="segment", segment_key="plan",
                           segment_value="enterprise")
    plain = make_customer("plain")
    big = make_customer("big")
    big.metadata = {"plan": "enterprise"}
    big.save()
    special = make_customer("special")
    special.metadata = {"plan": "enterprise"}
    special.save()
    own = make_rule((5, Severity.CRITICAL), name="Special", scope="customer", customer=special)

    assert rule_for_wallet(default_wallet(plain)) == global_rule
    assert rule_for_wallet(default_wallet(big)) == enterprise
    assert rule_for_wallet(default_wallet(special)) == own
    AlertRule.objects.filter(pk=own.pk).update(active=False)
    assert rule_for_wallet(default_wallet(special)) == enterprise


def test_quiet_hours_hold_sms_until_they_end(settings):
    settings.ALERTS_SMS_BACKEND = "console"
    customer = make_customer("tokyo", timezone_name="Asia/Tokyo")
    profile = AlertsProfile.objects.create(customer=customer, billing_phone="+81300000000",
                                           quiet_hours_start=time(22, 0), quiet_hours_end=time(7, 0))
    night = datetime(2026, 4, 1, 15, 30, tzinfo=UTC)  # 00:30 in Tokyo
    assert quiet_hours_end(profile, customer, night) == datetime(2026, 4, 1, 22, 0, tzinfo=UTC)  # 07:00 local
    assert quiet_hours_end(profile, customer, datetime(2026, 4, 1, 3, 0, tzinfo=UTC)) is None  # noon there

    rule = make_rule((10, Severity.WARNING), sms=True, email=False, webhook=False)
    notify(event_type="wallet.balance_low", customer=customer, rule=rule, payload={}, dedupe="q", now=night)
    sms = Notification.objects.get(channel="sms")
    assert sms.status == Notification.Status.PENDING and sms.not_before == datetime(2026, 4, 1, 22, 0, tzinfo=UTC)

    alerts_sweep(now=night + timedelta(hours=1))
    sms.refresh_from_db()
    assert sms.status == Notification.Status.PENDING and sms.attempts == 0
    alerts_sweep(now=datetime(2026, 4, 1, 22, 1, tzinfo=UTC))
    sms.refresh_from_db()
    assert sms.status == Notification.Status.SENT


def test_roles_get_alerts_permissions():
    roles.ensure_roles()
    finance = set(Group.objects.get(name=roles.FINANCE).permissions.filter(content_type__app_label="alerts")
                  .values_list("codename", flat=True))
    support = set(Group.objects.get(name=roles.SUPPORT).permissions.filter(content_type__app_label="alerts")
                  .values_list("codename", flat=True))
    auditor = set(Group.objects.get(name=roles.AUDITOR).permissions.filter(content_type__app_label="alerts")
                  .values_list("codename", flat=True))
    assert {"change_alertrule", "add_webhookendpoint", "change_autotopup", "view_notification"} <= finance
    assert support == auditor and support and all(code.startswith("view_") for code in support)
    assert "view_pendingtopupapproval" in support
    assert not Group.objects.get(name=roles.SALES_REP).permissions.filter(content_type__app_label="alerts").exists()


def test_schedule_names_a_registered_task():
    import alerts.tasks  # noqa: F401 - registers the tasks
    from alerts.schedule import SCHEDULE, jobs
    from config.celery import app

    assert {entry["task"] for entry in SCHEDULE.values()} <= set(app.tasks)
    assert [job.task for job in jobs()] == ["alerts.tasks.alerts_sweep"]
