"""Every billing changelist, change page and add page answers 200 to the roles
whose permissions allow it and 403 to the others."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.urls import reverse

from billing import roles
from billing.models import LedgerEntry, UsageEvent

pytestmark = pytest.mark.django_db

ROLES = ("finance", "sales_rep", "sales_manager", "support", "auditor", "superuser")
ROLE_GROUP = {"finance": roles.FINANCE, "sales_rep": roles.SALES_REP, "sales_manager": roles.SALES_MANAGER,
              "support": roles.SUPPORT, "auditor": roles.AUDITOR}
# Rows created only by services or by the system: nobody adds them in the admin.
NO_ADD_PAGE = {"ledgerentry", "usageevent", "reservation", "auditevent", "outboxevent", "jobrun",
               "idempotencyrecord", "packdiscounttier", "teamspend"}
MODELS = [m for m in roles.BILLING_MODELS if m != "packdiscounttier"]  # edited inline on its pack


def allowed(role: str, perm: str) -> bool:
    return role == "superuser" or f"billing.{perm}" in roles.role_permissions()[ROLE_GROUP[role]]


def test_every_billing_model_is_registered():
    registered = {model._meta.model_name for model in admin.site._registry if model._meta.app_label == "billing"}
    assert set(MODELS) <= registered


@pytest.mark.parametrize("role", ROLES)
def test_changelists_and_change_pages_follow_the_role(role, book, staff_client):
    client = staff_client(role)
    for model in MODELS:
        can_view = allowed(role, f"view_{model}") or allowed(role, f"change_{model}")
        expected = 200 if can_view else 403
        changelist = client.get(reverse(f"admin:billing_{model}_changelist"))
        assert changelist.status_code == expected, (role, model, "changelist")
        change = client.get(reverse(f"admin:billing_{model}_change", args=[book[model].pk]))
        assert change.status_code == expected, (role, model, "change")


@pytest.mark.parametrize("role", ROLES)
def test_add_pages_follow_the_role(role, book, staff_client):
    client = staff_client(role)
    for model in MODELS:
        response = client.get(reverse(f"admin:billing_{model}_add"))
        may_add = model not in NO_ADD_PAGE and allowed(role, f"add_{model}")
        assert response.status_code == (200 if may_add else 403), (role, model)


@pytest.mark.parametrize("role", ROLES)
def test_nobody_edits_or_deletes_a_ledger_entry(role, book, staff_client):
    client = staff_client(role)
    for row in (book["ledgerentry"], book["usageevent"]):
        name = row._meta.model_name
        before = LedgerEntry.objects.filter(pk=row.pk).values().first() if name == "ledgerentry" else (
            UsageEvent.objects.filter(pk=row.pk).values().first())
        change_url = reverse(f"admin:billing_{name}_change", args=[row.pk])
        assert client.post(change_url, {"amount": "999", "memo": "edited"}).status_code == 403
        delete_url = reverse(f"admin:billing_{name}_delete", args=[row.pk])
        assert client.get(delete_url).status_code == 403
        assert client.post(delete_url, {"post": "yes"}).status_code == 403
        after = type(row).objects.filter(pk=row.pk).values().first()
        assert after == before


def test_customer_page_shows_balances_grants_ledger_holds_and_chart(book, staff_client):
    response = staff_client("sales_rep").get(reverse("admin:billing_customer_change", args=[book["customer"].pk]))
    page = response.content.decode()
    wallet = book["wallet"]
    assert response.status_code == 200
    assert "Available" in page and "Ledger balance" in page and "Overage" in page
    assert f'<span class="value cd-ledger-balance">{wallet.__class__.objects.get(pk=wallet.pk).ledger_balance}' \
           in page
    assert f'href="/admin/billing/creditgrant/{book["creditgrant"].pk}/change/"' in page
    assert f'/admin/billing/reservation/{book["reservation"].pk}/change/' in page
    assert "Usage, last 30 days" in page and "<svg" in page
    assert f"?wallet__id__exact={wallet.pk}" in page
    # Sales reps see the numbers but not the finance buttons.
    assert "Grant credits" not in page and "Sell a pack" not in page


def test_finance_sees_the_finance_buttons(book, staff_client):
    page = staff_client("finance").get(
        reverse("admin:billing_customer_change", args=[book["customer"].pk])).content.decode()
    assert f'/admin/billing/creditgrant/add/?wallet={book["wallet"].pk}' in page
    assert "Sell a pack" in page and "Request adjustment" in page


def test_ledger_list_filtered_by_wallet_and_capped_count(book, staff_client):
    client = staff_client("auditor")
    response = client.get(reverse("admin:billing_ledgerentry_changelist"),
                          {"wallet__id__exact": book["wallet"].pk})
    assert response.status_code == 200
    total = LedgerEntry.objects.filter(wallet=book["wallet"]).count()
    assert len(response.context["cl"].result_list) == total
    assert response.context["cl"].full_result_count is None


def test_index_dashboard_counts(book, staff_client):
    response = staff_client("finance").get(reverse("admin:index"))
    page = response.content.decode()
    assert response.status_code == 200
    assert 'id="creditdesk-dashboard"' in page
    assert '<td class="cd-pending-grants">1</td>' in page
    assert '<td class="cd-pending-adjustments">1</td>' in page
    assert '<td class="cd-used-today">6.000000</td>' in page


def test_pending_approvals_queue_splits_mine_from_others(book, staff_client):
    changelist = reverse("admin:billing_creditgrant_changelist")
    other = staff_client("finance", "checker")
    waiting = other.get(changelist, {"approval": "others"}).context["cl"].result_list
    assert [g.pk for g in waiting] == [book["pending"].pk]
    other.force_login(book["requester"])
    assert list(other.get(changelist, {"approval": "others"}).context["cl"].result_list) == []
    mine = other.get(changelist, {"approval": "mine"}).context["cl"].result_list
    assert [g.pk for g in mine] == [book["pending"].pk]
    adjustments = other.get(reverse("admin:billing_adjustment_changelist"), {"approval": "mine"})
    assert [a.pk for a in adjustments.context["cl"].result_list] == [book["adjustment"].pk]


def test_audit_list_filters_by_object_type_and_actor(book, staff_client):
    client = staff_client("auditor")
    response = client.get(reverse("admin:billing_auditevent_changelist"),
                          {"object_type": "billing.apikey", "actor": book["requester"].pk})
    rows = response.context["cl"].result_list
    assert [(e.action, e.actor_id) for e in rows] == [("api_key.create", book["requester"].pk)]


def test_audit_history_is_shown_to_auditors_not_to_sales(book, staff_client):
    url = reverse("admin:billing_creditgrant_change", args=[book["pending"].pk])
    assert "grant.create" in staff_client("auditor").get(url).content.decode()
    assert 'id="audit-history"' not in staff_client("sales_rep", "rep2").get(url).content.decode()


def test_ledger_and_usage_search_by_customer(book, staff_client):
    from tests.factories import make_customer

    make_customer("someone-else")
    client = staff_client("auditor")
    ledger = client.get(reverse("admin:billing_ledgerentry_changelist"), {"q": "acme"}).context["cl"]
    assert {e.wallet_id for e in ledger.result_list} == {book["wallet"].pk} and len(ledger.result_list) == 3
    assert list(client.get(reverse("admin:billing_ledgerentry_changelist"),
                           {"q": "someone-else"}).context["cl"].result_list) == []
    usage = reverse("admin:billing_usageevent_changelist")
    assert [u.event_id for u in client.get(usage, {"q": "acme"}).context["cl"].result_list] == ["evt-1"]
    assert [u.event_id for u in client.get(usage, {"q": "acme evt-1"}).context["cl"].result_list] == ["evt-1"]
    assert list(client.get(usage, {"q": "acme nope"}).context["cl"].result_list) == []
    assert list(client.get(usage, {"q": "ghost"}).context["cl"].result_list) == []


def test_wallet_page_shows_its_panel_and_finance_operations(book, staff_client):
    url = reverse("admin:billing_wallet_change", args=[book["wallet"].pk])
    page = staff_client("finance").get(url).content.decode()
    assert f'id="wallet-{book["wallet"].pk}"' in page and "Open holds" in page
    assert reverse("admin:billing_wallet_pause", args=[book["wallet"].pk]) in page
    auditor_page = staff_client("auditor", "aud2").get(url).content.decode()
    assert "Usable grants, in consumption order" in auditor_page
    assert reverse("admin:billing_wallet_pause", args=[book["wallet"].pk]) not in auditor_page


def test_a_rate_version_that_priced_usage_is_read_only(book, staff_client):
    client = staff_client("finance")
    cost = book["featurecost"]
    response = client.get(reverse("admin:billing_featurecost_change", args=[cost.pk]))
    assert "credits_per_unit" not in response.context["adminform"].form.fields
    client.post(reverse("admin:billing_featurecost_change", args=[cost.pk]), {"note": "n", "credits_per_unit": "0"})
    cost.refresh_from_db()
    assert cost.credits_per_unit == 2
