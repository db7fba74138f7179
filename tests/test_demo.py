"""The demo data (``make run``): loads once, tells its story, keeps every ledger whole."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.apps import apps
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import transaction
from django.db.models import Max, Min
from django.utils import timezone

from billing.management.commands.seed_demo import DEMO_API_KEY, DEMO_CUSTOMERS, DEMO_STAFF
from billing.models import (
    CreditGrant,
    Customer,
    FeatureCost,
    LedgerEntry,
    PackPurchase,
    Reservation,
    UsageEvent,
)
from tests.conftest import assert_ledger_consistent

pytestmark = pytest.mark.django_db


def _row_counts() -> dict[str, int]:
    models = [*apps.get_app_config("billing").get_models(), get_user_model()]
    return {model._meta.label: model.objects.count() for model in models}


@pytest.fixture(scope="module")
def _seeded(django_db_setup, django_db_blocker):
    """Seed once for the module (it takes a while), inside a transaction rolled back at its end."""
    with django_db_blocker.unblock(), transaction.atomic():
        call_command("seed_demo", stdout=StringIO())
        yield
        transaction.set_rollback(True)


@pytest.fixture
def demo(_seeded, db):
    return None


def test_seed_twice_changes_nothing(demo):
    before = _row_counts()
    second = StringIO()
    call_command("seed_demo", stdout=second)
    assert _row_counts() == before
    assert "already loaded" in second.getvalue()
    assert before["billing.UsageEvent"] > 2000


def test_replayed_history_notifies_nobody(demo):
    from billing.models import OutboxEvent

    assert OutboxEvent.objects.exists()
    assert not OutboxEvent.objects.filter(dispatched_at__isnull=True).exists()


def test_every_demo_ledger_is_consistent(demo):
    for customer in Customer.objects.filter(external_id__in=DEMO_CUSTOMERS):
        for wallet in customer.wallets.all():
            assert_ledger_consistent(wallet)


def test_the_story_is_there(demo):
    now = timezone.now()
    acme, nova, pixel = (Customer.objects.get(external_id=key) for key in ("acme", "novalabs", "pixelforge"))

    # ~60 days of usage, priced by two rate-card versions of gpt-tokens and Acme's override.
    span = UsageEvent.objects.aggregate(first=Min("occurred_at"), last=Max("occurred_at"))
    assert span["last"] - span["first"] > timedelta(days=55)
    assert FeatureCost.objects.filter(feature__key="gpt-tokens", customer__isnull=True).count() == 2
    assert UsageEvent.objects.filter(customer=acme, feature__key="gpt-tokens").values("credits_per_unit") \
        .distinct().count() == 1
    assert UsageEvent.objects.filter(customer=pixel, feature__key="gpt-tokens").values("credits_per_unit") \
        .distinct().count() == 2

    # The startup: a prepaid pack on a block wallet, an expired promo, a refusal, a discounted top-up.
    assert pixel.wallets.get().policy == "block"
    assert PackPurchase.objects.filter(customer=pixel, pack__code="growth-50k").exists()
    assert PackPurchase.objects.get(customer=pixel, pack__code="starter-10k").discount_percent > 0
    assert LedgerEntry.objects.filter(wallet__customer=pixel, type=LedgerEntry.Type.EXPIRY).exists()
    assert UsageEvent.objects.filter(customer=pixel, status=UsageEvent.Status.REJECTED).exists()

    # The trial: promotional credits only, expiring within days.
    trial = CreditGrant.objects.get(wallet__customer=nova)
    assert trial.kind == "promotional" and trial.status == "active" and 0 < trial.remaining < 500
    assert now < trial.expires_at < now + timedelta(days=7)

    # The enterprise: one pooled overdraft wallet, three teams, overage, a hold, a grant awaiting approval.
    wallet = acme.wallets.get()
    assert wallet.policy == "overdraft" and wallet.credit_limit > 0 and wallet.overage > 0
    teams = set(UsageEvent.objects.filter(customer=acme).values_list("properties__team", flat=True))
    assert teams == {"research", "product", "support"}
    pending = CreditGrant.objects.get(wallet=wallet, status=CreditGrant.Status.PENDING_APPROVAL)
    assert pending.requested_by.username == "finance"
    assert Reservation.objects.filter(wallet=wallet, status="open", expires_at__gt=now).count() == 1
    assert Reservation.objects.filter(wallet=wallet, status="captured").exists()

    # History carries its own dates, not the seeding moment.
    oldest = LedgerEntry.objects.filter(wallet=wallet).order_by("sequence").first()
    assert oldest.created_at < now - timedelta(days=55)
    usage_span = LedgerEntry.objects.filter(wallet=wallet, type__in=["usage", "overage"]).aggregate(
        first=Min("created_at"), last=Max("created_at"))
    assert usage_span["first"] < now - timedelta(days=55) and usage_span["last"] > now - timedelta(days=2)


def test_demo_logins_work_and_the_admin_renders(demo, client):
    out = StringIO()
    call_command("ensure_demo_admin", stdout=out)
    assert "admin / creditdesk-demo" in out.getvalue()
    assert client.login(username="admin", password="creditdesk-demo")
    for url in ("/admin/", "/admin/billing/customer/", "/admin/billing/ledgerentry/", "/admin/billing/jobrun/"):
        assert client.get(url).status_code == 200, url
    for username in DEMO_STAFF:
        assert client.login(username=username, password="creditdesk-demo"), username


def test_demo_api_key_reads_a_balance(demo, client):
    response = client.get("/api/v1/customers/novalabs/balance", HTTP_AUTHORIZATION=f"Bearer {DEMO_API_KEY}")
    assert response.status_code == 200, response.content
    assert response.json()["by_kind"]["promotional"] == str(CreditGrant.objects.get(wallet__customer__external_id="novalabs").remaining)


def test_acme_teams_have_monthly_limits_on_the_wallet_page(demo, client):
    from billing.models import TeamSpendingLimit

    limits = TeamSpendingLimit.objects.filter(wallet__customer__external_id="acme", wallet__is_default=True)
    assert sorted(limits.values_list("team", flat=True)) == ["product", "research", "support"]
    assert all(limit.spends.get().spent > 0 for limit in limits)  # this month's usage counted
    client.force_login(get_user_model().objects.get(username="finance"))
    page = client.get(f"/admin/billing/wallet/{limits[0].wallet_id}/change/").content.decode()
    assert "Team spending limits" in page and "research" in page


def test_acme_contract_runs_to_its_true_up(demo, client):
    from billing.models import Contract, InvoiceLine
    from billing.services.contracts import contract_statement

    contract = Contract.objects.get(customer__external_id="acme")
    assert contract.status == "active" and contract.wallet.is_default
    upfront = contract.instalments.get()
    assert upfront.grant.kind == "contract" and upfront.invoice.lines.get().kind == InvoiceLine.Kind.CONTRACT
    due = contract.true_ups.order_by("period_end").first()
    assert due.settled_at is None and due.period_end < timezone.now()
    statement = contract_statement(contract=contract)
    assert statement.consumed > statement.committed and statement.projected_true_up_amount > 0

    client.force_login(get_user_model().objects.get(username="finance"))
    page = client.get(f"/admin/billing/contract/{contract.pk}/change/").content.decode()
    assert "Run true-up now" in page and "Projected true-up amount" in page
    overage = contract.wallet.overage
    assert client.post(f"/admin/billing/contract/{contract.pk}/true_up/", {}).status_code == 302
    due.refresh_from_db()
    assert due.settled_at is not None and due.overage_credits == overage > 0
    assert due.invoice.lines.get().kind == InvoiceLine.Kind.TRUE_UP and due.invoice.status == "issued"
    contract.wallet.refresh_from_db()
    assert contract.wallet.overage == 0
    assert_ledger_consistent(contract.wallet)


def _alerts_rows() -> dict[str, list]:
    return {model._meta.label: sorted(model.objects.values_list(flat=False))
            for model in apps.get_app_config("alerts").get_models() if not model._meta.proxy}


def test_alerts_demo_sets_up_once(demo):
    from alerts.models import AlertRule, AlertsProfile, AutoTopUp, WebhookEndpoint

    call_command("seed_alerts_demo", url="http://127.0.0.1:8000", stdout=StringIO())
    before, users_before = _alerts_rows(), _row_counts()
    second = StringIO()
    call_command("seed_alerts_demo", url="http://127.0.0.1:8000", stdout=second)
    assert _alerts_rows() == before and _row_counts() == users_before
    assert "nothing to do" in second.getvalue()

    rule = AlertRule.objects.get(scope=AlertRule.Scope.GLOBAL)
    assert sorted((lv.kind, int(lv.value), lv.severity) for lv in rule.levels.all()) == [
        ("absolute", 0, "critical"), ("days_left", 7, "info"),
        ("percent", 10, "critical"), ("percent", 20, "warning"), ("percent", 50, "info")]
    assert AlertsProfile.objects.filter(customer__external_id__in=DEMO_CUSTOMERS).count() == 3
    assert AlertsProfile.objects.exclude(technical_phone="").get().customer.external_id == "pixelforge"
    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.url == f"http://127.0.0.1:8000/alerts/demo-receiver/{endpoint.pk}" and endpoint.enabled
    assert set(endpoint.event_types) >= {"wallet.balance_low", "wallet.balance_recovered", "wallet.topped_up"}
    auto = AutoTopUp.objects.get()
    assert auto.wallet.customer.external_id == "pixelforge" and auto.enabled and auto.pack.code == "starter-10k"
    assert auto.monthly_max_count and auto.monthly_max_credits and auto.cooldown
    finance = get_user_model().objects.get(username="finance")
    assert finance.email and finance.groups.filter(name="Finance").exists()
    # Billing now watches Pixel Forge's thresholds (marks set by the first evaluation).
    assert auto.wallet.alert_below is not None


def test_orbit_is_on_a_hybrid_plan_with_a_closed_period_and_its_invoice(demo, client):
    from billing.models import Invoice, InvoiceLine, Subscription

    subscription = Subscription.objects.get(customer__external_id="orbit")
    assert subscription.plan.code == "scale-monthly" and subscription.status in ("active", "past_due")
    first = subscription.periods.get(index=0)
    assert first.closed_at is not None and first.invoice.status == Invoice.Status.PAID
    assert first.invoice.lines.filter(kind=InvoiceLine.Kind.PLAN_FEE, amount=Decimal("199.00")).exists()
    change = subscription.changes.get()
    assert change.from_plan.code == "team-monthly" and change.credits_delta > 0 and change.remaining_charge > 0
    assert_ledger_consistent(subscription.wallet)

    client.force_login(get_user_model().objects.get(username="finance"))
    page = client.get(f"/admin/billing/subscription/{subscription.pk}/change/").content.decode()
    assert first.invoice.number in page and "Change plan" in page
    html = client.get(f"/admin/billing/invoice/{first.invoice.pk}/html/")
    assert html.status_code == 200 and first.invoice.number in html.content.decode()
    pdf = client.get(f"/admin/billing/invoice/{first.invoice.pk}/pdf/")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")


def test_pixelforge_got_a_refund_from_a_second_person_and_the_revenue_report_reconciles(demo, client):
    from billing.models import CreditNote, RefundRequest
    from billing.services.revenue import month_of, revenue_report

    refund = RefundRequest.objects.select_related("requested_by", "decided_by").get(
        grant__wallet__customer__external_id="pixelforge")
    assert refund.status == RefundRequest.Status.REFUNDED
    assert (refund.requested_by.username, refund.decided_by.username) == ("support", "finance")
    note = CreditNote.objects.get(refund_request=refund)
    assert (note.credits, note.amount) == (Decimal("50000"), Decimal("450.00"))
    year, month = month_of(timezone.now())
    for y, m in ((year, month), (year - 1, 12) if month == 1 else (year, month - 1)):
        report = revenue_report(year=y, month=m, currency="USD")
        assert report.reconciles, [(c.label, c.expected, c.actual) for c in report.checks if not c.ok]
    assert report.usage > 0 and report.closing_deferred > 0
    client.force_login(get_user_model().objects.get(username="auditor"))
    page = client.get("/admin/billing/creditnote/revenue-report/").content.decode()
    assert "cd-reconciles\">yes<" in page
