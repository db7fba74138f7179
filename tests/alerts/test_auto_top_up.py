"""Auto top-up: one purchase per breach under 16 threads, its guards, approval
and payment failures."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.utils import timezone

from alerts.models import AutoTopUp, AutoTopUpRun
from alerts.services.auto_top_up import auto_top_up_execute, auto_top_up_payment_failed, auto_top_up_set
from billing.models import CreditGrant, PackPurchase
from billing.selectors import wallet_balance
from billing.services.grants import default_wallet, grant_approve
from tests.alerts.conftest import charge
from tests.conftest import assert_ledger_consistent
from tests.factories import CreditPackFactory, UserFactory, grant, make_customer, make_feature

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def feature():
    return make_feature("api-call", "1")


@pytest.fixture
def pack():
    return CreditPackFactory(code="refill-500", credits=Decimal("500"), price=Decimal("50.00"), validity_days=None)


def funded(credits, email="ap@acme.test"):
    customer = make_customer(email=email)
    wallet = default_wallet(customer)
    if credits:
        grant(wallet, credits)
    return customer, wallet


def finance_user():
    user = UserFactory(username="finance-1", email="finance@creditdesk.test")
    user.groups.add(Group.objects.get(name="Finance"))
    return user


def run_threads(count, target):
    errors = []

    def body(i):
        try:
            target(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def test_sixteen_threads_draining_one_wallet_get_one_top_up_per_breach(feature, pack, caplog):
    customer, wallet = funded(200)
    auto_top_up_set(wallet=wallet, threshold=Decimal("100"), pack=pack, cooldown=timedelta(0), monthly_max_count=3)

    def drain(i):
        for n in range(20):
            charge(customer, feature, 5, event_id=f"t{i}-{n}")

    run_threads(16, drain)

    runs = list(AutoTopUpRun.objects.filter(wallet=wallet).order_by("breach_seq"))
    auto = AutoTopUp.objects.get(wallet=wallet)
    assert runs, "the wallet fell below its threshold: at least one breach"
    assert [r.breach_seq for r in runs] == list(range(1, auto.breach_seq + 1))
    bought = [r for r in runs if r.status == AutoTopUpRun.Status.SUCCEEDED]
    grants = CreditGrant.objects.filter(wallet=wallet, source=CreditGrant.Source.AUTO_TOP_UP)
    assert grants.count() == len(bought) == PackPurchase.objects.filter(wallet=wallet).count()
    assert 1 <= len(bought) <= 3
    assert {r.grant_id for r in bought} == set(grants.values_list("pk", flat=True))
    for r in runs:
        assert r.status in (AutoTopUpRun.Status.SUCCEEDED, AutoTopUpRun.Status.SKIPPED), r
    for g in grants:
        assert g.per_unit_cost_basis == Decimal("0.1") and g.price_paid == Decimal("50.00")
    assert wallet_balance(wallet).available >= 0
    assert_ledger_consistent(wallet)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_sixteen_deliveries_of_one_breach_buy_once(feature, pack, monkeypatch):
    from alerts import tasks

    monkeypatch.setattr(tasks.auto_top_up_execute, "delay", lambda *a, **k: None)  # keep the run queued
    customer, wallet = funded(150)
    auto_top_up_set(wallet=wallet, threshold=Decimal("100"), pack=pack)
    charge(customer, feature, 60)
    run = AutoTopUpRun.objects.get()
    assert run.status == AutoTopUpRun.Status.QUEUED and run.available_at_breach == Decimal("90")

    run_threads(16, lambda i: auto_top_up_execute(run_id=run.pk))

    run.refresh_from_db()
    assert run.status == AutoTopUpRun.Status.SUCCEEDED
    assert PackPurchase.objects.filter(wallet=wallet).count() == 1
    assert wallet_balance(wallet).available == Decimal("590")
    assert_ledger_consistent(wallet)


def test_target_mode_buys_enough_packs_in_one_purchase(feature, pack):
    customer, wallet = funded(300)
    auto_top_up_set(wallet=wallet, threshold=Decimal("200"), pack=pack, mode=AutoTopUp.Mode.TARGET,
                    target_balance=Decimal("1200"))
    charge(customer, feature, 200)  # 100 left: 1100 short → 3 packs
    purchase = PackPurchase.objects.get(wallet=wallet)
    assert purchase.quantity == 3 and purchase.credits == Decimal("1500")
    assert wallet_balance(wallet).available == Decimal("1600")


def test_cooldown_and_monthly_cap_with_runaway_notice(feature, pack, mailoutbox):
    finance_user()
    customer, wallet = funded(150)
    auto_top_up_set(wallet=wallet, threshold=Decimal("100"), pack=pack, cooldown=timedelta(hours=1),
                    monthly_max_count=2)
    charge(customer, feature, 60)  # breach 1 → bought (590)
    charge(customer, feature, 500)  # breach 2, within cooldown → skipped
    runs = list(AutoTopUpRun.objects.order_by("breach_seq"))
    assert [r.status for r in runs] == ["succeeded", "skipped"] and "Cooldown" in runs[1].detail

    AutoTopUp.objects.filter(wallet=wallet).update(cooldown=timedelta(0))
    grant(wallet, 20)  # 110: re-armed
    charge(customer, feature, 20)  # breach 3 → bought (second this month)
    grant(wallet, 10)
    charge(customer, feature, 500)  # breach 4 → over the monthly count
    runs = list(AutoTopUpRun.objects.order_by("breach_seq"))
    assert [r.status for r in runs] == ["succeeded", "skipped", "succeeded", "skipped"]
    assert "Monthly cap" in runs[3].detail
    caps = [m for m in mailoutbox if "cap reached" in m.subject]
    assert len(caps) == 1 and caps[0].to == ["finance@creditdesk.test"]


def test_awaiting_payment_blocks_the_next_and_failures_disable(feature, pack, mailoutbox):
    finance_user()
    customer, wallet = funded(150)
    auto_top_up_set(wallet=wallet, threshold=Decimal("100"), pack=pack, cooldown=timedelta(0),
                    await_payment=True, max_consecutive_failures=2)
    charge(customer, feature, 60)
    first = AutoTopUpRun.objects.get()
    assert first.status == AutoTopUpRun.Status.AWAITING_PAYMENT
    assert first.grant.status == CreditGrant.Status.PENDING_PAYMENT
    assert wallet_balance(wallet).available == Decimal("90")

    auto_top_up_payment_failed(run_id=first.pk, reason="Card declined")
    first.refresh_from_db()
    assert first.status == AutoTopUpRun.Status.PAYMENT_FAILED
    assert first.grant.status == CreditGrant.Status.VOIDED

    grant(wallet, 20)  # 110: re-armed
    charge(customer, feature, 20)  # breach 2 → awaiting payment
    second = AutoTopUpRun.objects.get(breach_seq=2)
    auto_top_up_payment_failed(run_id=second.pk, reason="Card declined again")
    auto = AutoTopUp.objects.get(wallet=wallet)
    assert not auto.enabled and "2 consecutive failures" in auto.disabled_reason
    assert len([m for m in mailoutbox if "Auto top-up disabled" in m.subject]) == 1


def test_require_approval_waits_in_finance_queue(feature, pack, mailoutbox):
    approver = finance_user()
    customer, wallet = funded(150)
    auto_top_up_set(wallet=wallet, threshold=Decimal("100"), pack=pack, require_approval=True)
    charge(customer, feature, 60)
    run = AutoTopUpRun.objects.get()
    assert run.status == AutoTopUpRun.Status.PENDING_APPROVAL
    assert run.grant.status == CreditGrant.Status.PENDING_APPROVAL
    assert run.purchase == PackPurchase.objects.get(wallet=wallet) and run.purchase.grant == run.grant
    assert any("awaits approval" in m.subject for m in mailoutbox)
    assert wallet_balance(wallet).available == Decimal("90")

    grant_approve(grant_id=run.grant_id, user=approver)
    run.refresh_from_db()
    assert run.status == AutoTopUpRun.Status.SUCCEEDED
    assert wallet_balance(wallet).available == Decimal("590")
    assert run.grant.price_paid == Decimal("50.00")


def test_execution_is_after_commit_never_inside_the_charge(feature, pack, monkeypatch):
    from alerts import tasks

    seen = []
    monkeypatch.setattr(tasks.auto_top_up_execute, "delay",
                        lambda run_id: seen.append((run_id, connection.in_atomic_block)))
    customer, wallet = funded(150)
    auto_top_up_set(wallet=wallet, threshold=Decimal("100"), pack=pack)
    charge(customer, feature, 60)
    assert seen == [(AutoTopUpRun.objects.get().pk, False)]
    assert PackPurchase.objects.count() == 0
    assert timezone.now()  # the run stays queued for the sweep to pick up if the task is lost


def test_demo_flow_draining_through_the_api(feature, pack, mailoutbox, webhook_receiver):
    """Draining a wallet through the API: a low-balance email, signed webhooks in
    the delivery log, an auto top-up, and a recovered notice."""
    from alerts.models import Notification, Severity, WebhookEndpoint
    from tests.alerts.conftest import make_rule
    from tests.billing.api.conftest import make_api

    make_rule((100, Severity.WARNING), (20, Severity.CRITICAL))
    endpoint = WebhookEndpoint.objects.create(url=webhook_receiver.url, event_types=[
        "wallet.balance_low", "wallet.balance_recovered", "wallet.topped_up", "wallet.depleted"])
    customer, wallet = funded(300)
    auto_top_up_set(wallet=wallet, threshold=Decimal("50"), pack=pack)
    api = make_api("usage:write")
    for n in range(6):
        status, body = api.post("/api/v1/usage", {"customer": customer.external_id, "feature": "api-call",
                                                  "quantity": "45", "event_id": f"demo-{n}"})
        assert status == 201, body

    # 300 → 255 → 210 → 165 → 120 → 75 (low) → 30 (top-up +500: 530, recovered)
    subjects = [m.subject for m in mailoutbox]
    assert any("running low (75.000000 left)" in s for s in subjects)
    assert any("500.000000 credits added" in s for s in subjects)
    assert any("back above 100.000000" in s for s in subjects)
    assert AutoTopUpRun.objects.get().status == AutoTopUpRun.Status.SUCCEEDED
    assert wallet_balance(wallet).available == Decimal("530")
    delivered = list(Notification.objects.filter(channel="webhook", endpoint=endpoint, status="sent")
                     .order_by("pk").values_list("event_type", flat=True))
    assert delivered == ["wallet.balance_low", "wallet.balance_recovered", "wallet.topped_up"]
    assert len(webhook_receiver.requests) == 3
