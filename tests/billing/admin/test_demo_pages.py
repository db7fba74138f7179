"""Every billing admin page renders over the demo data (the story a new user
clicks through first), for finance and for a superuser, in bounded queries."""

from __future__ import annotations

from io import StringIO

import pytest
from django.apps import apps
from django.contrib import admin
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.models import Customer

pytestmark = pytest.mark.django_db
MAX_CHANGELIST_QUERIES = 16


@pytest.mark.parametrize("role", ["finance", "superuser"])
def test_every_billing_page_renders_over_the_demo_data(role, staff_client):
    call_command("seed_demo", stdout=StringIO())
    client = staff_client(role, f"demo-{role}")
    assert client.get(reverse("admin:index")).status_code == 200
    for model in apps.get_app_config("billing").get_models():
        if model not in admin.site._registry:
            continue
        name = model._meta.model_name
        with CaptureQueriesContext(connection) as ctx:
            changelist = client.get(reverse(f"admin:billing_{name}_changelist"))
        assert changelist.status_code == 200, name
        assert len(ctx.captured_queries) <= MAX_CHANGELIST_QUERIES, (name, len(ctx.captured_queries))
        for obj in model.objects.order_by("-pk")[:2]:
            assert client.get(reverse(f"admin:billing_{name}_change", args=[obj.pk])).status_code == 200, name
    for customer in Customer.objects.all():
        page = client.get(reverse("admin:billing_customer_change", args=[customer.pk]))
        assert page.status_code == 200 and "Usable grants, in consumption order" in page.content.decode()
