"""A newcomer's click-through of the whole admin over the demo data: for the
demo ``admin`` and each demo role user (``seed_demo.DEMO_STAFF``), every
registered model's changelist (also with a few of its list filters, a search,
an ordering and a page past the end), add page, change, history and delete
pages of a few rows, and every custom admin URL (operation pages, the revenue
report and its CSV, invoice and credit note HTML/PDF, bulk promo). Nothing may
answer 500: the pages a role may see answer 200, the others 403 (or a 302
back with a message for an operation the row's state does not allow)."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import transaction
from django.test import Client
from django.urls import reverse

from billing.management.commands.seed_demo import DEMO_STAFF

pytestmark = pytest.mark.django_db
USERS = ("admin", *DEMO_STAFF)
STANDARD_URLS = ("_changelist", "_add", "_history", "_delete", "_change", "_autocomplete")
ROWS_PER_MODEL = 2
CHOICES_PER_FILTER = 2


@pytest.fixture(scope="module")
def _seeded(django_db_setup, django_db_blocker):
    """The demo (billing story, alerts, logins) once for the module, rolled back at its end."""
    with django_db_blocker.unblock(), transaction.atomic():
        call_command("seed_demo", stdout=StringIO())
        call_command("seed_alerts_demo", url="http://127.0.0.1:8000", stdout=StringIO())
        call_command("ensure_demo_admin", stdout=StringIO())
        yield
        transaction.set_rollback(True)


class Crawl:
    def __init__(self, username: str):
        self.user = get_user_model().objects.get(username=username)
        self.client = Client(raise_request_exception=False)
        self.client.force_login(self.user)
        self.failures: list[tuple[str, object]] = []
        self.seen = 0

    def get(self, url: str, data: dict | None = None, allowed=(200,)):
        self.seen += 1
        try:
            response = self.client.get(url, data or {})
        except Exception as exc:  # noqa: BLE001 — a crash is a finding, keep crawling
            self.failures.append((f"{url} {data or ''}", repr(exc)))
            return None
        if response.status_code not in allowed:
            self.failures.append((f"{url} {data or ''}", response.status_code))
        return response

    def may(self, model, *actions: str) -> bool:
        opts = model._meta
        return any(self.user.has_perm(f"{opts.app_label}.{action}_{opts.model_name}") for action in actions)


def _changelist_variants(crawl: Crawl, model, model_admin, url: str) -> None:
    """A few list filters, a search, an ordering and a page past the end."""
    request = crawl.client.get(url).wsgi_request
    changelist = model_admin.get_changelist_instance(request)
    assert isinstance(changelist, ChangeList)
    for spec in changelist.filter_specs:
        picked = [c for c in spec.choices(changelist) if not c.get("selected")][:CHOICES_PER_FILTER]
        for choice in picked:
            crawl.get(url + choice["query_string"])
    if model_admin.get_search_fields(request):
        for query in ("a", "demo 1", "%_'\"", "9" * 30):
            crawl.get(url, {"q": query})
    crawl.get(url, {"o": "-1"})
    crawl.get(url, {"p": "99999"}, allowed=(200, 302))
    crawl.get(url, {"no_such_field__exact": "x"}, allowed=(200, 302))


def _crawl_model(crawl: Crawl, model, model_admin) -> None:
    opts = model._meta
    base = f"admin:{opts.app_label}_{opts.model_name}"
    can_view = crawl.may(model, "view", "change")
    changelist_url = reverse(f"{base}_changelist")
    if crawl.get(changelist_url, allowed=(200,) if can_view else (403,)) is None or not can_view:
        return
    _changelist_variants(crawl, model, model_admin, changelist_url)
    crawl.get(reverse(f"{base}_add"), allowed=(200, 403))
    rows = list(model_admin.get_queryset(crawl.client.get(changelist_url).wsgi_request)
                .order_by("-pk").values_list("pk", flat=True)[:ROWS_PER_MODEL])
    customs = [p for p in model_admin.get_urls()
               if p.name and not p.name.endswith(STANDARD_URLS) and "<path:object_id>" in str(p.pattern)]
    for pk in rows:
        crawl.get(reverse(f"{base}_change", args=[pk]))
        crawl.get(reverse(f"{base}_history", args=[pk]))
        crawl.get(reverse(f"{base}_delete", args=[pk]), allowed=(200, 403))
        for pattern in customs:
            # An operation the row's state does not allow sends back to the row with a message.
            crawl.get(reverse(f"admin:{pattern.name}", args=[pk]), allowed=(200, 302, 403))
    for pattern in model_admin.get_urls():
        if pattern.name and not pattern.name.endswith(STANDARD_URLS) and "<" not in str(pattern.pattern):
            crawl.get(reverse(f"admin:{pattern.name}"), allowed=(200, 403))


@pytest.mark.parametrize("username", USERS)
def test_every_admin_page_answers_without_a_server_error(username, _seeded, db):
    crawl = Crawl(username)
    crawl.get(reverse("admin:index"))
    for model, model_admin in admin.site._registry.items():
        _crawl_model(crawl, model, model_admin)
    assert crawl.failures == []
    assert crawl.seen > 100


@pytest.mark.parametrize("username", ["admin", "finance", "auditor", "support"])
def test_revenue_report_html_csv_and_bad_parameters(username, _seeded, db):
    crawl = Crawl(username)
    may = crawl.user.has_perm("billing.view_creditnote")
    ok = (200,) if may else (403,)
    url = reverse("admin:billing_revenue_report")
    for params in ({}, {"format": "csv"}, {"month": "2026-02", "currency": "EUR"},
                   {"month": "2026-13"}, {"month": "garbage", "format": "csv"}, {"currency": "XXXXXXXX"},
                   {"month": "0000-01"}, {"month": "99999-01"}):
        crawl.get(url, params, allowed=ok + (302, 400) if may else ok)
    assert crawl.failures == []


@pytest.mark.parametrize("username", ["admin", "auditor"])
def test_operation_pages_of_unknown_rows_are_not_server_errors(username, _seeded, db):
    crawl = Crawl(username)
    for model_admin in admin.site._registry.values():
        for pattern in model_admin.get_urls():
            if pattern.name and "<path:object_id>" in str(pattern.pattern):
                for missing in ("987654321", "not-a-number"):
                    crawl.get(reverse(f"admin:{pattern.name}", args=[missing]), allowed=(302, 403, 404))
    assert crawl.failures == []


@pytest.mark.parametrize("username", ["admin", "finance", "support"])
def test_every_add_form_refuses_an_empty_or_junk_submission_without_a_server_error(username, _seeded, db):
    """Every add form the role may open validates: an empty or junk POST shows the form again with its errors
    (200), never a 500, and creates nothing."""
    crawl = Crawl(username)
    junk = {"amount": "1e999", "quantity": "-0", "customer": "987654321", "wallet": "x", "plan": "'",
            "starts_at_0": "2026-02-30", "starts_at_1": "25:61", "currency": "EURO", "email": "not-an-email",
            "external_id": "", "name": "\x00"}
    for model in admin.site._registry:
        if not crawl.may(model, "add"):
            continue
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_add")
        before = model._default_manager.count()
        for data in ({}, junk):
            crawl.seen += 1
            response = crawl.client.post(url, data)
            if response.status_code not in (200, 403):
                crawl.failures.append((f"POST {url} {sorted(data)}", response.status_code))
        if model._default_manager.count() != before:
            crawl.failures.append((f"POST {url}", "created a row from an empty or junk form"))
    assert crawl.failures == []


def test_every_change_form_answers_an_empty_or_junk_submission_without_a_server_error(_seeded, db):
    """The superuser posts an empty and a junk form to one row of every model: form errors (200), a saved
    row (302) or a refusal (403), never a 500."""
    crawl = Crawl("admin")
    junk = {"amount": "abc", "credits_per_unit": "-1e999", "monthly_limit": "∞", "currency": "EURO",
            "email": "not-an-email", "name": "\x00", "expires_at_0": "2026-02-30", "expires_at_1": "25:61"}
    for model in admin.site._registry:
        pk = model._default_manager.order_by("-pk").values_list("pk", flat=True).first()
        if pk is None:
            continue
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[pk])
        for data in ({}, junk):
            crawl.seen += 1
            response = crawl.client.post(url, data)
            if response.status_code not in (200, 302, 403):
                crawl.failures.append((f"POST {url} {sorted(data)}", response.status_code))
    assert crawl.failures == []
