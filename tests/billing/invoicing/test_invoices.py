"""Invoices and payments: numbering, rounding, statuses, and the pending-payment
grant that becomes usable when its invoice is paid."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from unittest import mock

import pytest
from django.core import mail
from django.db import connection
from django.utils import timezone

from billing.errors import Conflict, InvalidRequest
from billing.models import (
    BillingProfile,
    CreditGrant,
    Invoice,
    InvoiceLine,
    LedgerEntry,
    OutboxEvent,
    Payment,
)
from billing.selectors import wallet_balance
from billing.services.grants import default_wallet
from billing.services.invoices import (
    invoice_add_line,
    invoice_create_draft,
    invoice_email_send,
    invoice_issue,
    invoice_void,
    pack_purchase_invoice,
    payment_record,
)
from billing.services.packs import pack_purchase
from tests.conftest import assert_ledger_consistent
from tests.factories import CreditPackFactory, make_customer

pytestmark = pytest.mark.django_db

MANUAL = InvoiceLine.Kind.MANUAL


def _invoice(customer, *lines, **kwargs) -> Invoice:
    invoice = invoice_create_draft(customer=customer, **kwargs)
    for description, quantity, unit_price in lines:
        invoice_add_line(invoice_id=invoice.pk, kind=MANUAL, description=description,
                         quantity=Decimal(quantity), unit_price=Decimal(unit_price))
    invoice.refresh_from_db()
    return invoice


def _issued(customer, amount="100.00", **kwargs) -> Invoice:
    return invoice_issue(invoice_id=_invoice(customer, ("Services", "1", amount), **kwargs).pk)


def test_lines_round_to_the_currency_and_tax_is_added_on_the_subtotal():
    customer = make_customer("acme", email="ap@acme.test")
    BillingProfile.objects.create(customer=customer, tax_rate=Decimal("19"), net_terms_days=14)
    invoice = _invoice(customer, ("Thirds", "3", "0.3333333333"), ("Odd", "1", "10.005"))

    assert [line.amount for line in invoice.lines.all()] == [Decimal("1.00"), Decimal("10.01")]
    assert invoice.subtotal == Decimal("11.01")
    assert invoice.tax == Decimal("2.09")  # 19 % of 11.01 = 2.0919
    assert invoice.total == Decimal("13.10")
    assert invoice.net_terms_days == 14
    assert invoice.billing_email == "ap@acme.test"


def test_zero_decimal_currency_rounds_to_whole_units():
    customer = make_customer("tokyo", currency="JPY")
    invoice = _invoice(customer, ("Credits", "3", "333.5"))
    assert invoice.currency == "JPY"
    assert invoice.total == Decimal("1001")  # 1000.5 rounds half up


def test_issue_gives_the_next_number_of_the_year_and_the_due_date_from_net_terms():
    customer = make_customer("numbers")
    left_as_draft = _invoice(customer, ("Never issued", "1", "5"))
    issued_at = datetime(2026, 3, 10, 12, tzinfo=UTC)
    first = invoice_issue(invoice_id=_invoice(customer, ("A", "1", "5")).pk, now=issued_at)
    second = invoice_issue(invoice_id=_invoice(customer, ("B", "1", "5")).pk, now=issued_at)
    next_year = invoice_issue(invoice_id=_invoice(customer, ("C", "1", "5")).pk,
                              now=datetime(2027, 1, 1, tzinfo=UTC))

    assert (first.number, second.number, next_year.number) == ("INV-2026-000001", "INV-2026-000002",
                                                               "INV-2027-000001")
    assert first.status == Invoice.Status.ISSUED
    assert first.due_at == issued_at + timedelta(days=30)
    left_as_draft.refresh_from_db()
    assert left_as_draft.number is None
    # Issuing again changes nothing and burns no number.
    assert invoice_issue(invoice_id=first.pk).number == "INV-2026-000001"


def test_a_refused_issue_burns_no_number():
    customer = make_customer("refused")
    empty = invoice_create_draft(customer=customer)
    with pytest.raises(InvalidRequest):
        invoice_issue(invoice_id=empty.pk)
    voided = _invoice(customer, ("Cancelled", "1", "5"))
    invoice_void(invoice_id=voided.pk, reason="Wrong customer")
    with pytest.raises(Conflict):
        invoice_issue(invoice_id=voided.pk)

    year = timezone.localtime().year
    assert _issued(customer).number == f"INV-{year}-000001"


def test_lines_can_only_be_added_to_drafts():
    invoice = _issued(make_customer("locked"))
    with pytest.raises(Conflict):
        invoice_add_line(invoice_id=invoice.pk, kind=MANUAL, description="Late", quantity=Decimal(1),
                         unit_price=Decimal(1))
    with pytest.raises(InvalidRequest):
        invoice_add_line(invoice_id=invoice_create_draft(customer=invoice.customer).pk, kind=MANUAL,
                         description="Negative", quantity=Decimal(1), unit_price=Decimal(-1))


def test_partial_then_full_payment_marks_the_invoice_paid():
    invoice = _issued(make_customer("payer"), amount="100.00")
    payment_record(invoice_id=invoice.pk, amount=Decimal("40.00"), reference="wire 1")
    invoice.refresh_from_db()
    assert (invoice.status, invoice.amount_paid, invoice.amount_due) == ("issued", Decimal("40"), Decimal("60"))

    with pytest.raises(Conflict):
        payment_record(invoice_id=invoice.pk, amount=Decimal("60.01"))
    with pytest.raises(InvalidRequest):
        payment_record(invoice_id=invoice.pk, amount=Decimal("0.001"))
    payment_record(invoice_id=invoice.pk, amount=Decimal("60.00"))
    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.PAID and invoice.paid_at is not None
    with pytest.raises(Conflict):
        payment_record(invoice_id=invoice.pk, amount=Decimal("1.00"))
    with pytest.raises(Conflict):
        invoice_void(invoice_id=invoice.pk, reason="too late")


def test_payments_on_drafts_are_refused_and_provider_events_count_once():
    customer = make_customer("provider")
    with pytest.raises(Conflict):
        payment_record(invoice_id=_invoice(customer, ("Draft", "1", "5")).pk, amount=Decimal("5"))
    invoice = _issued(customer, amount="50.00")
    first = payment_record(invoice_id=invoice.pk, amount=Decimal("20.00"), provider_event_id="evt_1",
                           method=Payment.Method.WEBHOOK)
    again = payment_record(invoice_id=invoice.pk, amount=Decimal("20.00"), provider_event_id="evt_1",
                           method=Payment.Method.WEBHOOK)
    assert again.pk == first.pk
    invoice.refresh_from_db()
    assert invoice.amount_paid == Decimal("20.00")


def _pending_purchase(external_id="buyer"):
    customer = make_customer(external_id, email=f"{external_id}@example.test")
    wallet = default_wallet(customer)
    pack = CreditPackFactory(code=f"pack-{external_id}", name="Starter pack", credits=Decimal("1000"),
                             price=Decimal("99.90"))
    purchase = pack_purchase(wallet=wallet, pack=pack, quantity=2, pending_payment=True)
    return wallet, purchase


def test_a_paid_pack_invoice_activates_the_waiting_grant():
    wallet, purchase = _pending_purchase()
    grant = purchase.grant
    assert grant.status == CreditGrant.Status.PENDING_PAYMENT
    invoice = pack_purchase_invoice(purchase_id=purchase.pk)
    assert invoice.status == Invoice.Status.ISSUED
    assert invoice.total == Decimal("199.80")
    assert pack_purchase_invoice(purchase_id=purchase.pk).pk == invoice.pk
    assert wallet_balance(wallet).available == 0

    payment_record(invoice_id=invoice.pk, amount=Decimal("100.00"))
    grant.refresh_from_db()
    assert grant.status == CreditGrant.Status.PENDING_PAYMENT  # partly paid: still waiting

    payment_record(invoice_id=invoice.pk, amount=Decimal("99.80"))
    grant.refresh_from_db()
    assert grant.status == CreditGrant.Status.ACTIVE and grant.remaining == Decimal("2000")
    assert wallet_balance(wallet).available == Decimal("2000")
    entry = LedgerEntry.objects.get(grant=grant)
    assert (entry.type, entry.amount, entry.reference) == ("grant", Decimal("2000"), f"invoice:{invoice.number}")
    assert OutboxEvent.objects.filter(topic="grant.activated", payload__grant=grant.pk).count() == 1
    assert_ledger_consistent(wallet)


def test_voiding_a_pack_invoice_voids_the_waiting_grant():
    wallet, purchase = _pending_purchase("canceller")
    invoice = pack_purchase_invoice(purchase_id=purchase.pk)
    invoice_void(invoice_id=invoice.pk, reason="Customer cancelled")
    purchase.grant.refresh_from_db()
    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.VOID and invoice.number is not None
    assert purchase.grant.status == CreditGrant.Status.VOIDED
    assert wallet_balance(wallet).available == 0
    assert_ledger_consistent(wallet)


def test_issuing_queues_the_email_and_the_email_carries_the_pdf(django_capture_on_commit_callbacks):
    customer = make_customer("mailed", email="billing@mailed.test")
    draft = _invoice(customer, ("Consulting day", "2", "800"))
    with mock.patch("billing.tasks.invoice_email_send.delay") as delay:
        with django_capture_on_commit_callbacks(execute=True):
            invoice = invoice_issue(invoice_id=draft.pk)
    delay.assert_called_once_with(invoice.pk)

    assert invoice_email_send(invoice_id=invoice.pk) is True
    assert invoice_email_send(invoice_id=invoice.pk) is False  # at most once
    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert message.to == ["billing@mailed.test"]
    assert invoice.number in message.subject
    name, content, mimetype = message.attachments[0]
    assert (name, mimetype) == (f"{invoice.number}.pdf", "application/pdf")
    assert content.startswith(b"%PDF")


@pytest.mark.django_db(transaction=True)
def test_concurrent_issuing_numbers_without_gaps_or_duplicates():
    customer = make_customer("concurrent")
    drafts = [_invoice(customer, (f"Line {i}", "1", "10")).pk for i in range(20)]
    barrier = threading.Barrier(len(drafts))
    errors: list[BaseException] = []

    def issue(invoice_id: int) -> None:
        try:
            barrier.wait(timeout=30)
            invoice_issue(invoice_id=invoice_id)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=issue, args=(pk,)) for pk in drafts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    year = timezone.localtime().year
    sequences = sorted(Invoice.objects.filter(pk__in=drafts).values_list("sequence", flat=True))
    assert sequences == list(range(1, 21))
    numbers = set(Invoice.objects.filter(pk__in=drafts).values_list("number", flat=True))
    assert numbers == {f"INV-{year}-{n:06d}" for n in range(1, 21)}
