"""Bulk promotional grant: selected customers or pasted external ids, once per submission."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse

from billing import admin_views
from billing.models import CreditGrant, JobRun, LedgerEntry
from tests.factories import make_customer

pytestmark = pytest.mark.django_db


def promo_grants():
    return CreditGrant.objects.filter(source="promotion", idempotency_key__startswith="bulk:")


def test_action_on_selected_customers_then_double_submit_grants_once(staff_client):
    client = staff_client("finance")
    customers = [make_customer(f"trial-{i}") for i in range(3)]
    page = client.post(reverse("admin:billing_customer_changelist"),
                       {"action": "bulk_promo_selected", "_selected_action": [c.pk for c in customers], "index": 0})
    assert page.status_code == 200
    form = page.context["form"]
    token = form["token"].value()
    assert form["customer_ids"].value() == ",".join(str(c.pk) for c in customers)
    data = {"customer_ids": form["customer_ids"].value(), "external_ids": "", "amount": "25", "days": "14",
            "reason": "spring promo", "token": token}
    first = client.post(reverse("admin:billing_customer_bulk_promo"), data)
    second = client.post(reverse("admin:billing_customer_bulk_promo"), data)
    assert (first.context["result"].granted, first.context["result"].already_granted) == (3, 0)
    assert (second.context["result"].granted, second.context["result"].already_granted) == (0, 3)
    assert promo_grants().count() == 3
    for customer in customers:
        grant = promo_grants().get(wallet__customer=customer)
        assert grant.kind == "promotional" and grant.original_amount == Decimal("25")
        assert grant.requested_by == client.user and grant.reason == "spring promo"
        assert abs((grant.expires_at - grant.created_at) - timedelta(days=14)) < timedelta(minutes=1)
        assert LedgerEntry.objects.filter(grant=grant, type="grant").count() == 1


def test_pasted_external_ids_report_the_unknown_ones(staff_client):
    client = staff_client("finance")
    make_customer("known-1")
    make_customer("known-2")
    page = client.get(reverse("admin:billing_customer_bulk_promo"))
    token = page.context["form"]["token"].value()
    response = client.post(reverse("admin:billing_customer_bulk_promo"), {
        "external_ids": "known-1\n\nnope-9\n known-2 \nknown-1\n", "amount": "5", "days": "30",
        "reason": "webinar", "token": token})
    result = response.context["result"]
    assert result.granted == 2 and result.unknown_ids == ["nope-9"]
    assert "nope-9" in response.content.decode()
    assert promo_grants().count() == 2


def test_a_fresh_page_is_a_fresh_submission(staff_client):
    client = staff_client("finance")
    make_customer("again-1")
    for _ in range(2):
        token = client.get(reverse("admin:billing_customer_bulk_promo")).context["form"]["token"].value()
        client.post(reverse("admin:billing_customer_bulk_promo"), {
            "external_ids": "again-1", "amount": "5", "days": "30", "reason": "monthly", "token": token})
    assert promo_grants().count() == 2


@pytest.mark.parametrize("bad", [
    {"amount": "-1"}, {"amount": "abc"}, {"days": "0"}, {"days": "99999"}, {"reason": ""}, {"token": "bad token"},
    {"external_ids": ""}, {"customer_ids": "1,x"}, {"external_ids": "a" * 300},
])
def test_bad_bulk_input_is_a_form_error(bad, staff_client):
    client = staff_client("finance")
    make_customer("bulk-bad")
    data = {"external_ids": "bulk-bad", "customer_ids": "", "amount": "5", "days": "30", "reason": "r",
            "token": "tok-bulk-000000000001", **bad}
    response = client.post(reverse("admin:billing_customer_bulk_promo"), data)
    assert response.status_code == 200 and response.context["form"].errors
    assert promo_grants().count() == 0


def test_large_selections_run_as_a_job_with_progress(staff_client, monkeypatch,
                                                     django_capture_on_commit_callbacks):
    monkeypatch.setattr(admin_views, "BULK_JOB_THRESHOLD", 3)
    monkeypatch.setattr(admin_views, "PROGRESS_EVERY", 2)
    monkeypatch.setattr(admin_views.bulk_promo_job, "delay", lambda job_id: admin_views.bulk_promo_job(job_id))
    client = staff_client("finance")
    ids = [make_customer(f"big-{i}").external_id for i in range(5)]
    token = client.get(reverse("admin:billing_customer_bulk_promo")).context["form"]["token"].value()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("admin:billing_customer_bulk_promo"), {
            "external_ids": "\n".join([*ids, "ghost"]), "amount": "1", "days": "7", "reason": "launch",
            "token": token})
    job = JobRun.objects.get(name="bulk_promo")
    assert response.status_code == 302 and response["Location"] == reverse("admin:billing_jobrun_change",
                                                                           args=[job.pk])
    assert (job.total, job.done, job.status) == (5, 5, "succeeded")
    assert job.detail["result"]["granted"] == 5 and job.detail["unknown_ids"] == ["ghost"]
    assert promo_grants().count() == 5
    admin_views.bulk_promo_job(job.pk)  # a redelivered or rerun job grants nothing new
    job.refresh_from_db()
    assert job.detail["result"]["already_granted"] == 5 and promo_grants().count() == 5
    page = client.get(reverse("admin:billing_jobrun_change", args=[job.pk]))
    assert page.status_code == 200 and "5 / 5 (100%)" in page.content.decode()


def test_customer_changelist_offers_the_bulk_button_to_finance_only(staff_client):
    make_customer("listed")
    finance = staff_client("finance").get(reverse("admin:billing_customer_changelist")).content.decode()
    assert reverse("admin:billing_customer_bulk_promo") in finance


def test_sales_rep_sees_neither_button_nor_action(staff_client):
    make_customer("listed")
    response = staff_client("sales_rep").get(reverse("admin:billing_customer_changelist"))
    assert reverse("admin:billing_customer_bulk_promo") not in response.content.decode()
    action_form = response.context["action_form"]
    assert action_form is None or "bulk_promo_selected" not in dict(action_form.fields["action"].choices)
