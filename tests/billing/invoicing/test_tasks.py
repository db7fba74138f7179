"""The invoicing Celery tasks: thin wrappers that call one service and record a JobRun."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.core import mail

from billing import tasks
from billing.models import InvoiceLine, JobRun, Plan
from billing.services.invoices import invoice_add_line, invoice_create_draft, invoice_issue
from billing.services.plans import subscription_start
from config.schedule import SCHEDULE
from tests.factories import make_customer

pytestmark = pytest.mark.django_db


def test_the_email_task_sends_the_issued_invoice_once():
    customer = make_customer("taskmail", email="ap@taskmail.test")
    invoice = invoice_create_draft(customer=customer)
    invoice_add_line(invoice_id=invoice.pk, kind=InvoiceLine.Kind.MANUAL, description="Setup", quantity=Decimal(1),
                     unit_price=Decimal("10"))
    invoice = invoice_issue(invoice_id=invoice.pk)
    assert tasks.invoice_email_send(invoice.pk) is True
    assert tasks.invoice_email_send(invoice.pk) is False
    assert [m.to for m in mail.outbox] == [["ap@taskmail.test"]]


def test_the_close_task_closes_ended_periods_and_records_its_run():
    plan = Plan.objects.create(code="basic", name="Basic", base_fee=Decimal("10"), included_credits=Decimal("100"))
    start = datetime(2026, 1, 10, 12, tzinfo=UTC)
    with time_machine.travel(start, tick=False):
        subscription_start(customer=make_customer("tasksub"), plan=plan)
    with time_machine.travel(start + timedelta(days=32), tick=False):
        assert tasks.subscriptions_close_due() == 1
    run = JobRun.objects.get(name="subscriptions_close_due")
    assert (run.status, run.detail["closed"]) == ("succeeded", 1)


def test_the_close_job_is_scheduled():
    assert "billing.tasks.subscriptions_close_due" in {job.task for job in SCHEDULE}


def test_the_status_task_ends_trials_records_its_run_and_is_scheduled():
    plan = Plan.objects.create(code="trial", name="Trial", base_fee=Decimal("10"), trial_days=7)
    start = datetime(2026, 1, 10, 12, tzinfo=UTC)
    with time_machine.travel(start, tick=False):
        subscription = subscription_start(customer=make_customer("taskstatus"), plan=plan)
    with time_machine.travel(start + timedelta(days=8), tick=False):
        assert tasks.subscriptions_refresh_status() == 1
        assert tasks.subscriptions_refresh_status() == 0
    subscription.refresh_from_db()
    assert subscription.status == "active"
    runs = JobRun.objects.filter(name="subscriptions_refresh_status").order_by("pk")
    assert [(run.status, run.detail["changed"]) for run in runs] == [("succeeded", 1), ("succeeded", 0)]
    assert "billing.tasks.subscriptions_refresh_status" in {job.task for job in SCHEDULE}
