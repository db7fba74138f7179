"""Finance operations in the admin write what the services write, refuse roles
that may not, and translate refusals into messages (never a 500)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from billing.models import Adjustment, AuditEvent, CreditGrant, LedgerEntry, PackPurchase
from billing.services.grants import grant_create
from tests.conftest import assert_ledger_consistent

pytestmark = pytest.mark.django_db


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def grant_form(target_wallet, **overrides):
    data = {"wallet": target_wallet.pk, "kind": "prepaid", "amount": "250", "priority": "40", "price_paid": "25",
            "reason": "bought by invoice 42", "token": "tok-grant-0000000001", "feature": "",
            "effective_at_0": "", "effective_at_1": "", "expires_at_0": "", "expires_at_1": ""}
    data.update(overrides)
    return data


def test_finance_grants_credits_once_per_submission(book, staff_client):
    client = staff_client("finance")
    wallet = book["wallet"]
    expires = timezone.now() + timedelta(days=90)
    data = grant_form(wallet, expires_at_0=expires.strftime("%Y-%m-%d"), expires_at_1="12:00:00")
    first = client.post(reverse("admin:billing_creditgrant_add"), data)
    again = client.post(reverse("admin:billing_creditgrant_add"), data, follow=True)
    grants = CreditGrant.objects.filter(wallet=wallet, idempotency_key="admin:tok-grant-0000000001")
    assert first.status_code == 302 and again.status_code == 200
    assert any("submitted before" in m for m in messages_of(again))
    assert grants.count() == 1
    grant = grants.get()
    assert (grant.original_amount, grant.priority, grant.status) == (Decimal("250"), 40, "active")
    assert grant.requested_by == client.user and grant.price_paid == Decimal("25")
    assert grant.expires_at.date() == expires.date()
    assert LedgerEntry.objects.filter(grant=grant, type="grant", amount=Decimal("250")).count() == 1
    assert_ledger_consistent(wallet)


@pytest.mark.parametrize("bad", [
    {"amount": "abc"}, {"amount": "NaN"}, {"amount": "1e400"}, {"amount": "-5"}, {"amount": "0"},
    {"amount": "1" * 40}, {"priority": "101"}, {"wallet": "999999"}, {"wallet": "x"},
    {"kind": "promotional", "price_paid": "3"}, {"expires_at_0": "2001-01-01", "expires_at_1": "00:00:00"},
    {"token": "short"}, {"kind": "adjustment"}, {"reason": ""},
])
def test_bad_grant_input_is_a_form_error_not_a_500(bad, book, staff_client):
    client = staff_client("finance")
    before = CreditGrant.objects.count()
    response = client.post(reverse("admin:billing_creditgrant_add"), grant_form(book["wallet"], **bad))
    assert response.status_code == 200
    assert response.context["form"].errors
    assert CreditGrant.objects.count() == before


@pytest.mark.parametrize("role", ["sales_rep", "sales_manager", "support", "auditor"])
def test_roles_without_rights_cannot_grant_void_approve_or_sell(role, book, staff_client):
    client = staff_client(role)
    entries = LedgerEntry.objects.count()
    grants = CreditGrant.objects.count()
    assert client.post(reverse("admin:billing_creditgrant_add"), grant_form(book["wallet"])).status_code == 403
    assert client.post(reverse("admin:billing_packpurchase_add"),
                       {"wallet": book["wallet"].pk, "pack": book["creditpack"].pk, "quantity": "1",
                        "token": "tok-sell-00000000001"}).status_code == 403
    assert client.get(reverse("admin:billing_customer_bulk_promo")).status_code == 403
    grant, pending = book["creditgrant"], book["pending"]
    for name, target in (("void", grant), ("extend", grant), ("approve", pending), ("reject", pending)):
        url = reverse(f"admin:billing_creditgrant_{name}", args=[target.pk])
        assert client.post(url, {"reason": "x"}).status_code == 403, name
    changelist = client.get(reverse("admin:billing_creditgrant_changelist"))
    if changelist.status_code == 200:
        action_form = changelist.context["action_form"]
        offered = {value for value, _ in action_form.fields["action"].choices} if action_form else set()
        assert not offered & {"approve_selected", "reject_selected", "void_selected", "extend_selected"}
        client.post(reverse("admin:billing_creditgrant_changelist"),
                    {"action": "approve_selected", "_selected_action": [pending.pk], "index": 0})
        client.post(reverse("admin:billing_creditgrant_changelist"),
                    {"action": "void_selected", "_selected_action": [grant.pk], "apply": "1", "reason": "x"})
    assert LedgerEntry.objects.count() == entries and CreditGrant.objects.count() == grants
    assert CreditGrant.objects.get(pk=pending.pk).status == "pending_approval"
    assert CreditGrant.objects.get(pk=grant.pk).status == "active"


@pytest.mark.parametrize("who", ["finance", "superuser"])
def test_nobody_approves_their_own_grant(who, book, staff_client):
    client = staff_client(who)
    pending = grant_create(wallet=book["wallet"], kind="promotional", amount=Decimal("90000"), reason="own",
                           requested_by=client.user)
    response = client.post(reverse("admin:billing_creditgrant_approve", args=[pending.pk]), follow=True)
    assert response.status_code == 200
    assert any("cannot approve" in m for m in messages_of(response))
    action = client.post(reverse("admin:billing_creditgrant_changelist"),
                         {"action": "approve_selected", "_selected_action": [pending.pk], "index": 0}, follow=True)
    assert any("cannot approve" in m for m in messages_of(action))
    pending.refresh_from_db()
    assert pending.status == "pending_approval" and pending.remaining == 0
    assert not LedgerEntry.objects.filter(grant=pending).exists()


def test_another_approver_approves_and_the_credits_arrive(book, staff_client):
    client = staff_client("finance", "approver")
    pending = book["pending"]
    response = client.post(reverse("admin:billing_creditgrant_changelist"),
                           {"action": "approve_selected", "_selected_action": [pending.pk], "index": 0}, follow=True)
    assert any("Approved 1 grant" in m for m in messages_of(response))
    pending.refresh_from_db()
    assert pending.status == "active" and pending.approved_by == client.user
    assert LedgerEntry.objects.get(grant=pending, type="grant").amount == Decimal("70000")
    assert_ledger_consistent(book["wallet"])


def test_reject_from_the_grant_page(book, staff_client):
    client = staff_client("finance", "approver")
    pending = book["pending"]
    url = reverse("admin:billing_creditgrant_reject", args=[pending.pk])
    assert client.get(url).status_code == 200
    response = client.post(url, {"reason": "too generous"})
    assert response.status_code == 302
    pending.refresh_from_db()
    assert pending.status == "rejected"
    assert AuditEvent.objects.filter(action="grant.reject", object_id=str(pending.pk)).exists()


def test_void_action_writes_a_void_entry(book, staff_client):
    client = staff_client("finance")
    grant = book["creditgrant"]
    remaining = CreditGrant.objects.get(pk=grant.pk).remaining
    changelist = reverse("admin:billing_creditgrant_changelist")
    confirm = client.post(changelist, {"action": "void_selected", "_selected_action": [grant.pk], "index": 0})
    assert confirm.status_code == 200 and "reason" in confirm.context["form"].fields
    missing_reason = client.post(changelist, {"action": "void_selected", "_selected_action": [grant.pk],
                                              "apply": "1", "reason": ""})
    assert missing_reason.status_code == 200 and missing_reason.context["form"].errors
    done = client.post(changelist, {"action": "void_selected", "_selected_action": [grant.pk], "apply": "1",
                                    "reason": "refunded"})
    assert done.status_code == 302
    grant.refresh_from_db()
    assert grant.status == "voided" and grant.remaining == 0
    assert LedgerEntry.objects.get(grant=grant, type="void").amount == -remaining
    assert_ledger_consistent(book["wallet"])


def test_extend_expiry_shows_in_the_ledger(book, staff_client):
    client = staff_client("finance")
    expiring = grant_create(wallet=book["wallet"], kind="promotional", amount=Decimal("10"), reason="trial",
                            expires_at=timezone.now() + timedelta(days=3))
    new_expiry = timezone.now() + timedelta(days=60)
    url = reverse("admin:billing_creditgrant_extend", args=[expiring.pk])
    past = client.post(url, {"expires_at_0": "2000-01-01", "expires_at_1": "00:00:00"})
    assert past.status_code == 200 and past.context["form"].errors
    response = client.post(url, {"expires_at_0": new_expiry.strftime("%Y-%m-%d"), "expires_at_1": "09:30:00",
                                 "reason": "goodwill"})
    assert response.status_code == 302
    expiring.refresh_from_db()
    assert expiring.expires_at.date() == new_expiry.date()
    entry = LedgerEntry.objects.get(grant=expiring, type="expiry_change")
    assert entry.amount == 0 and "goodwill" in entry.memo


def test_sell_pack_once_per_submission(book, staff_client):
    client = staff_client("finance")
    data = {"wallet": book["wallet"].pk, "pack": book["creditpack"].pk, "quantity": "5",
            "token": "tok-sell-00000000002"}
    page = client.get(reverse("admin:billing_packpurchase_add"), {"wallet": book["wallet"].pk})
    assert page.status_code == 200 and "Starter" in page.content.decode()
    assert client.post(reverse("admin:billing_packpurchase_add"), data).status_code == 302
    again = client.post(reverse("admin:billing_packpurchase_add"), data, follow=True)
    assert any("nothing new was sold" in m for m in messages_of(again))
    purchase = PackPurchase.objects.get(idempotency_key="admin:tok-sell-00000000002")
    assert purchase.credits == Decimal("5000") and purchase.discount_percent == Decimal("10")
    assert purchase.total_price == Decimal("450.00") and purchase.purchased_by == client.user
    assert LedgerEntry.objects.get(grant=purchase.grant, type="grant").amount == Decimal("5000")
    bad = client.post(reverse("admin:billing_packpurchase_add"), {**data, "quantity": "0"})
    assert bad.status_code == 200 and bad.context["form"].errors


def test_adjustment_request_and_approval_by_someone_else(book, staff_client, client):
    asker = staff_client("finance", "asker")
    response = asker.post(reverse("admin:billing_adjustment_add"),
                          {"wallet": book["wallet"].pk, "amount": "12.5", "reason": "missed credit"})
    assert response.status_code == 302
    adjustment = Adjustment.objects.get(reason="missed credit")
    assert adjustment.status == "pending_approval" and adjustment.requested_by == asker.user
    own = asker.post(reverse("admin:billing_adjustment_approve", args=[adjustment.pk]), follow=True)
    assert any("cannot approve" in m for m in messages_of(own))
    adjustment.refresh_from_db()
    assert adjustment.status == "pending_approval"
    staff_client("finance", "checker").post(reverse("admin:billing_adjustment_approve", args=[adjustment.pk]))
    adjustment.refresh_from_db()
    assert adjustment.status == "applied"
    assert LedgerEntry.objects.filter(grant=adjustment.grant, type="grant", amount=Decimal("12.5")).exists()
    zero = staff_client("finance", "third").post(reverse("admin:billing_adjustment_add"),
                                                 {"wallet": book["wallet"].pk, "amount": "0", "reason": "x"})
    assert zero.status_code == 200 and zero.context["form"].errors


def test_wallet_pause_and_resume(book, staff_client):
    client = staff_client("finance")
    wallet = book["wallet"]
    client.post(reverse("admin:billing_wallet_pause", args=[wallet.pk]), {"reason": "chargeback"})
    wallet.refresh_from_db()
    assert wallet.status == "paused"
    client.post(reverse("admin:billing_wallet_resume", args=[wallet.pk]))
    wallet.refresh_from_db()
    assert wallet.status == "active"


def test_grant_change_page_cannot_be_saved(book, staff_client):
    client = staff_client("superuser")
    grant = CreditGrant.objects.get(pk=book["creditgrant"].pk)
    response = client.post(reverse("admin:billing_creditgrant_change", args=[grant.pk]), {"remaining": "1"})
    assert response.status_code == 403
    assert CreditGrant.objects.get(pk=grant.pk).remaining == grant.remaining == Decimal("994")


def test_the_approve_button_is_offered_to_others_only(book, staff_client):
    url = reverse("admin:billing_creditgrant_change", args=[book["pending"].pk])
    approve_url = reverse("admin:billing_creditgrant_approve", args=[book["pending"].pk])
    client = staff_client("finance", "checker")
    assert approve_url in client.get(url).content.decode()
    client.force_login(book["requester"])
    assert approve_url not in client.get(url).content.decode()


def test_release_a_hold_from_the_admin(book, staff_client):
    hold = book["reservation"]
    response = staff_client("finance").post(reverse("admin:billing_reservation_release", args=[hold.pk]))
    assert response.status_code == 302
    hold.refresh_from_db()
    assert hold.status == "released"
