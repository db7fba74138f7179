"""A real Celery worker, as a separate process, delivers a balance-low notice:
charge → crossing hook → task queued after commit → worker → signed webhook
received on 127.0.0.1 and verified with standardwebhooks."""

from __future__ import annotations

import json
import os
import time
import uuid
from decimal import Decimal

import pytest
from standardwebhooks import Webhook

from alerts.models import Notification, Severity, WebhookEndpoint
from billing.services.grants import default_wallet
from config.celery import app as celery_app
from tests.alerts.conftest import charge, make_rule
from tests.billing.test_celery_integration import _start, _stop, _test_database_url
from tests.factories import grant, make_customer, make_feature

WAIT_SECONDS = 60


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_worker_delivers_the_signed_webhook(tmp_path, webhook_receiver, mailoutbox):
    queue = f"creditdesk-alerts-test-{uuid.uuid4().hex[:12]}"
    previous = celery_app.conf.task_always_eager, celery_app.conf.task_default_queue
    celery_app.conf.task_always_eager = False
    celery_app.conf.task_default_queue = queue  # this test's messages go to its own worker only
    env = {**os.environ, "DATABASE_URL": _test_database_url(), "PYTHONUNBUFFERED": "1",
           "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend"}
    worker, worker_log = _start("worker", ["worker", "-Q", queue, "-P", "solo", "--loglevel", "INFO",
                                           "--without-gossip", "--without-mingle", "--without-heartbeat",
                                           "--hostname", f"{queue}@localhost"], env, tmp_path)
    try:
        feature = make_feature("api-call", "1")
        make_rule((50, Severity.WARNING), email=False)
        endpoint = WebhookEndpoint.objects.create(url=webhook_receiver.url, event_types=["wallet.balance_low"])
        customer = make_customer("acme")
        wallet = default_wallet(customer)
        grant(wallet, 100)
        deadline = time.monotonic() + WAIT_SECONDS
        while wallet.alert_below is None and time.monotonic() < deadline:  # the worker set the marks
            assert worker.poll() is None, worker_log.read_text()
            time.sleep(0.2)
            wallet.refresh_from_db()
        assert wallet.alert_below == Decimal("50.000001"), worker_log.read_text()

        charge(customer, feature, 60)
        while not webhook_receiver.requests and time.monotonic() < deadline:
            assert worker.poll() is None, worker_log.read_text()
            time.sleep(0.2)
    finally:
        _stop(worker)
        celery_app.conf.task_always_eager, celery_app.conf.task_default_queue = previous

    assert len(webhook_receiver.requests) == 1, worker_log.read_text()
    request = webhook_receiver.requests[0]
    body = Webhook(endpoint.secret).verify(request["body"], request["headers"])
    assert body["type"] == "wallet.balance_low" and body["data"]["available"] == "40.000000"
    delivery = Notification.objects.get(channel="webhook")
    assert delivery.status == Notification.Status.SENT and delivery.attempt_log.get().status_code == 200
    assert "alerts.tasks.deliver_notification" in worker_log.read_text()
    assert json.loads(request["body"])["data"]["customer"] == "acme"
