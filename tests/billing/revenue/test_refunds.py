"""Refunds of unused prepaid credits: request → approval by another person →
refund entry, credit note, deferred revenue reversed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from unittest import mock

import pytest
import time_machine
from django.utils import timezone

from billing.errors import Conflict, PermissionDenied
from billing.models import CreditGrant, CreditNote, LedgerEntry, OutboxEvent, RefundRequest
from billing.services import refunds as refunds_service
from billing.services.grants import default_wallet, grant_create
from billing.services.invoices import pack_purchase_invoice, payment_record
from billing.services.packs import pack_purchase
from billing.services.refunds import refund_approve, refund_reject, refund_request
from billing.services.revenue import grant_figures_now
from tests.billing.revenue.conftest import charge
from tests.conftest import assert_ledger_consistent
from tests.factories import make_customer

pytestmark = pytest.mark.django_db


def test_support_asks_finance_approves_and_the_credits_leave_with_a_credit_note(bought, api_feature, support,
                                                                                finance):
    wallet, purchase = bought
    charge(wallet, api_feature, 250)
    refund = refund_request(grant_id=purchase.grant_id, credits=Decimal("300"), reason="Unused, customer asked",
                            requested_by=support)
    grant = CreditGrant.objects.get(pk=purchase.grant_id)
    assert refund.status == RefundRequest.Status.PENDING_APPROVAL and grant.remaining == Decimal("750")

    refund = refund_approve(refund_id=refund.pk, user=finance)

    grant.refresh_from_db()
    assert refund.status == RefundRequest.Status.REFUNDED
    assert grant.remaining == Decimal("450") and grant.status == CreditGrant.Status.ACTIVE
    entry = LedgerEntry.objects.get(grant=grant, type=LedgerEntry.Type.REFUND)
    assert entry.amount == Decimal("-300")
    note = refund.credit_note
    assert note.number == f"CN-{timezone.now().year}-000001"
    assert (note.credits, note.amount, note.currency) == (Decimal("300"), Decimal("30.00"), "USD")
    assert note.ledger_entry == entry and note.pack_purchase == purchase and note.grant == grant
    assert refund.amount == Decimal("30.00") and refund.decided_by == finance
    figures = grant_figures_now(grant)
    # 100.00 paid: 25.00 recognized (250 used), 30.00 refunded, 45.00 still deferred.
    assert (figures.paid, figures.recognized, figures.refunded, figures.deferred) == (
        Decimal("100.00"), Decimal("25.00"), Decimal("30.00"), Decimal("45.00"))
    assert OutboxEvent.objects.filter(topic="refund.approved", payload__credit_note=note.number).exists()
    assert_ledger_consistent(wallet)


def test_nobody_approves_their_own_refund_and_support_cannot_approve(bought, support, finance, finance2):
    _, purchase = bought
    refund = refund_request(grant_id=purchase.grant_id, credits=None, reason="All of it", requested_by=finance)
    with pytest.raises(PermissionDenied):
        refund_approve(refund_id=refund.pk, user=finance)
    with pytest.raises(PermissionDenied):
        refund_approve(refund_id=refund.pk, user=support)
    assert not LedgerEntry.objects.filter(type=LedgerEntry.Type.REFUND).exists()
    refund = refund_approve(refund_id=refund.pk, user=finance2)
    assert refund.refunded_credits == Decimal("1000") and refund.amount == Decimal("100.00")
    grant = CreditGrant.objects.get(pk=purchase.grant_id)
    assert grant.remaining == 0 and grant.status == CreditGrant.Status.DEPLETED
    with pytest.raises(Conflict):
        refund_approve(refund_id=refund.pk, user=finance2)


def test_all_unused_is_counted_at_approval(bought, api_feature, support, finance):
    wallet, purchase = bought
    refund = refund_request(grant_id=purchase.grant_id, credits=None, reason="Closing the account",
                            requested_by=support)
    charge(wallet, api_feature, 123.5)
    refund = refund_approve(refund_id=refund.pk, user=finance)
    assert refund.refunded_credits == Decimal("876.5") and refund.amount == Decimal("87.65")
    figures = grant_figures_now(CreditGrant.objects.get(pk=purchase.grant_id))
    assert figures.recognized + figures.refunded == Decimal("100.00") and figures.deferred == 0
    assert_ledger_consistent(wallet)


def test_over_refund_is_refused_at_request_and_again_at_approval(bought, api_feature, support, finance):
    wallet, purchase = bought
    with pytest.raises(Conflict) as refused:
        refund_request(grant_id=purchase.grant_id, credits=Decimal("1000.000001"), reason="Too much",
                       requested_by=support)
    assert refused.value.code == "over_refund"
    refund = refund_request(grant_id=purchase.grant_id, credits=Decimal("900"), reason="Unused",
                            requested_by=support)
    charge(wallet, api_feature, 200)  # only 800 left now
    with pytest.raises(Conflict) as refused:
        refund_approve(refund_id=refund.pk, user=finance)
    assert refused.value.code == "over_refund"
    refund.refresh_from_db()
    assert refund.status == RefundRequest.Status.PENDING_APPROVAL
    assert not CreditNote.objects.exists() and not LedgerEntry.objects.filter(type="refund").exists()
    assert CreditGrant.objects.get(pk=purchase.grant_id).remaining == Decimal("800")


def test_a_rejected_request_changes_nothing(bought, support, finance):
    wallet, purchase = bought
    refund = refund_request(grant_id=purchase.grant_id, credits=Decimal("10"), reason="Unused",
                            requested_by=support)
    before = LedgerEntry.objects.filter(wallet=wallet).count()
    refund = refund_reject(refund_id=refund.pk, user=finance, reason="Used in the meantime")
    assert refund.status == RefundRequest.Status.REJECTED and refund.decision_note == "Used in the meantime"
    assert LedgerEntry.objects.filter(wallet=wallet).count() == before
    assert CreditGrant.objects.get(pk=purchase.grant_id).remaining == Decimal("1000")
    assert not CreditNote.objects.exists()
    with pytest.raises(Conflict):
        refund_approve(refund_id=refund.pk, user=finance)


def test_free_and_expired_credits_are_not_refundable(db, support):
    wallet = default_wallet(make_customer("free"))
    promo = grant_create(wallet=wallet, kind="promotional", amount=Decimal("50"), require_approval=False)
    with pytest.raises(Conflict) as refused:
        refund_request(grant_id=promo.pk, credits=None, reason="x", requested_by=support)
    assert refused.value.code == "not_refundable"
    paid = grant_create(wallet=wallet, kind="prepaid", amount=Decimal("50"), price_paid=Decimal("5"),
                        expires_at=timezone.now() + timedelta(days=1), require_approval=False)
    with time_machine.travel(timezone.now() + timedelta(days=2)), pytest.raises(Conflict):
        refund_request(grant_id=paid.pk, credits=None, reason="x", requested_by=support)


def test_sales_cannot_request_refunds(bought, make_staff):
    from billing import roles

    _, purchase = bought
    with pytest.raises(PermissionDenied):
        refund_request(grant_id=purchase.grant_id, credits=None, reason="x",
                       requested_by=make_staff(roles.SALES_REP, "rep"))


def test_credit_notes_are_numbered_without_gaps_per_year(pack, support, finance):
    wallet = default_wallet(make_customer("many"))
    with time_machine.travel(datetime(2031, 12, 31, 22, 0, tzinfo=UTC), tick=False):
        grants = [pack_purchase(wallet=wallet, pack=pack).grant_id for _ in range(3)]
        requests = [refund_request(grant_id=g, credits=Decimal("1"), reason="x", requested_by=support)
                    for g in grants]
    with time_machine.travel(datetime(2031, 12, 31, 23, 0, tzinfo=UTC), tick=False):
        refund_approve(refund_id=requests[0].pk, user=finance)
        # A failure after the number was taken rolls the number back with everything else.
        with mock.patch.object(refunds_service.events, "publish", side_effect=RuntimeError("boom")), \
                pytest.raises(RuntimeError):
            refund_approve(refund_id=requests[1].pk, user=finance)
        refund_approve(refund_id=requests[1].pk, user=finance)
    with time_machine.travel(datetime(2032, 1, 1, 0, 30, tzinfo=UTC), tick=False):
        refund_approve(refund_id=requests[2].pk, user=finance)
    assert list(CreditNote.objects.order_by("pk").values_list("number", flat=True)) == [
        "CN-2031-000001", "CN-2031-000002", "CN-2032-000001"]


def test_the_credit_note_links_the_invoice_the_credits_were_bought_on(pack, support, finance):
    wallet = default_wallet(make_customer("invoiced"))
    purchase = pack_purchase(wallet=wallet, pack=pack, pending_payment=True)
    invoice = pack_purchase_invoice(purchase_id=purchase.pk)
    payment_record(invoice_id=invoice.pk, amount=invoice.total)
    refund = refund_request(grant_id=purchase.grant_id, credits=Decimal("100"), reason="x", requested_by=support)
    note = refund_approve(refund_id=refund.pk, user=finance).credit_note
    assert note.invoice == invoice and note.amount == Decimal("10.00")


def test_the_credit_note_is_emailed_once_with_its_pdf(bought, support, finance, django_capture_on_commit_callbacks):
    from django.core import mail

    from billing.services.refunds import credit_note_email_send

    wallet, purchase = bought
    wallet.customer.email = "billing@buyer.example"
    wallet.customer.save(update_fields=["email"])
    refund = refund_request(grant_id=purchase.grant_id, credits=Decimal("40"), reason="Unused", requested_by=support)
    with mock.patch("billing.tasks.credit_note_email_send.delay") as delay, \
            django_capture_on_commit_callbacks(execute=True):
        note = refund_approve(refund_id=refund.pk, user=finance).credit_note
    delay.assert_called_once_with(note.pk)
    assert note.billing_email == "billing@buyer.example" and mail.outbox == []
    assert credit_note_email_send(credit_note_id=note.pk) is True
    [message] = mail.outbox
    assert message.to == ["billing@buyer.example"] and note.number in message.subject
    assert "Credited to you: 4.00 USD" in message.body
    [(name, content, mimetype)] = message.attachments
    assert (name, mimetype) == (f"{note.number}.pdf", "application/pdf") and content.startswith(b"%PDF")
    note.refresh_from_db()
    assert note.emailed_at is not None
    assert credit_note_email_send(credit_note_id=note.pk) is False and len(mail.outbox) == 1
