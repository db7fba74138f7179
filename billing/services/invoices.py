"""Invoices and payments (DESIGN.md §5): drafts with lines, gapless numbers per
year given at issue, void, payments (manual or from the provider's webhook),
and the pending-payment grant that becomes usable once its invoice is paid.

Every function runs in one transaction and raises ``BillingError``. Lock order:
the invoice row first, then the year's number counter, then grants and the
wallet (``billing.services.locks``), so no two services here deadlock.
Money is rounded only through ``billing.numbers.round_money``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Max, Sum
from django.utils import timezone

from billing import events
from billing.errors import Conflict, InvalidRequest, NotFound
from billing.models import (
    BillingProfile,
    CreditGrant,
    Customer,
    Invoice,
    InvoiceLine,
    PackPurchase,
    Payment,
    SubscriptionPeriod,
)
from billing.numbers import MAX_QUANTITY, MAX_RATE, ZERO, round_money, round_rate
from billing.services.audit import audit_record
from billing.services.grants import grant_activate_paid, grant_void

NUMBER_FORMAT = "INV-{year}-{sequence:06d}"


def lock_invoice(invoice_id: int) -> Invoice:
    try:
        return Invoice.objects.select_for_update(of=("self",)).select_related("customer").get(pk=invoice_id)
    except Invoice.DoesNotExist:
        raise NotFound(f"No invoice #{invoice_id}.") from None


def billing_profile(customer: Customer) -> BillingProfile:
    """The customer's billing profile; an unsaved one with the defaults when none was set."""
    profile = BillingProfile.objects.filter(customer=customer).first()
    return profile or BillingProfile(customer=customer, net_terms_days=settings.CREDITDESK_INVOICE_NET_TERMS_DAYS)


def invoice_create_draft(
    *, customer: Customer, currency: str | None = None, tax_rate: Decimal | None = None,
    net_terms_days: int | None = None, memo: str = "", actor=None, actor_label: str = "",
) -> Invoice:
    """Open a draft invoice (no number yet). Tax rate, net terms and billing email
    default to the customer's billing profile."""
    profile = billing_profile(customer)
    tax_rate = profile.tax_rate if tax_rate is None else Decimal(tax_rate)
    if not ZERO <= tax_rate <= 100:
        raise InvalidRequest("The tax rate is a percent from 0 to 100.", details={"tax_rate": "must be 0..100"})
    with transaction.atomic():
        invoice = Invoice.objects.create(
            customer=customer, currency=currency or customer.currency, tax_rate=tax_rate,
            net_terms_days=profile.net_terms_days if net_terms_days is None else net_terms_days,
            billing_email=profile.billing_email or customer.email, memo=memo,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        audit_record(actor=actor, actor_label=actor_label, action="invoice.create", obj=invoice)
    return invoice


def _recompute_totals(invoice: Invoice) -> None:
    subtotal = invoice.lines.aggregate(total=Sum("amount"))["total"] or ZERO
    invoice.subtotal = round_money(subtotal, invoice.currency)
    invoice.tax = round_money(invoice.subtotal * invoice.tax_rate / Decimal(100), invoice.currency)
    invoice.total = invoice.subtotal + invoice.tax
    invoice.save(update_fields=["subtotal", "tax", "total"])


def invoice_add_line(
    *, invoice_id: int, kind: str, description: str, quantity: Decimal, unit_price: Decimal,
    pack_purchase: PackPurchase | None = None, actor=None, actor_label: str = "",
) -> InvoiceLine:
    """Add a line to a draft: amount = quantity × unit price rounded to the
    currency; the invoice's subtotal, tax and total follow. Credit notes carry a
    negative unit price, every other kind a non-negative one. Raises Conflict
    unless the invoice is a draft."""
    if kind not in InvoiceLine.Kind.values:
        raise InvalidRequest(f"Unknown line kind {kind!r}.", details={"kind": f"one of {InvoiceLine.Kind.values}"})
    if not description.strip():
        raise InvalidRequest("Describe the line.", details={"description": "required"})
    quantity, unit_price = Decimal(quantity), round_rate(Decimal(unit_price))
    if not ZERO < quantity <= MAX_QUANTITY:
        raise InvalidRequest("The quantity must be positive.", details={"quantity": "must be > 0"})
    if abs(unit_price) > MAX_RATE:
        raise InvalidRequest("The unit price is too large.", details={"unit_price": f"at most {MAX_RATE}"})
    if (kind == InvoiceLine.Kind.CREDIT_NOTE) != (unit_price < 0) and unit_price != 0:
        raise InvalidRequest("Only credit notes take a negative unit price.",
                             details={"unit_price": "negative for credit notes, otherwise >= 0"})
    with transaction.atomic():
        invoice = lock_invoice(invoice_id)
        if invoice.status != Invoice.Status.DRAFT:
            raise Conflict(f"{invoice} is {invoice.status}; lines can be added to drafts only.")
        position = (invoice.lines.aggregate(last=Max("position"))["last"] or 0) + 1
        line = InvoiceLine.objects.create(
            invoice=invoice, position=position, kind=kind, description=description[:500], quantity=quantity,
            unit_price=unit_price, amount=round_money(quantity * unit_price, invoice.currency),
            pack_purchase=pack_purchase,
        )
        _recompute_totals(invoice)
        audit_record(actor=actor, actor_label=actor_label, action="invoice.add_line", obj=invoice,
                     changes={"kind": kind, "description": description, "amount": line.amount})
    return line


def _next_number(year: int) -> int:
    """Take the year's next number. The upsert locks the counter row until the
    issuing transaction ends, so concurrent issues queue here and a rolled-back
    issue gives its number back."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO billing_invoicenumbercounter (year, last_number) VALUES (%s, 1) "
            "ON CONFLICT (year) DO UPDATE SET last_number = billing_invoicenumbercounter.last_number + 1 "
            "RETURNING last_number",
            [year],
        )
        return cursor.fetchone()[0]


def invoice_issue(*, invoice_id: int, actor=None, actor_label: str = "", now: datetime | None = None) -> Invoice:
    """Issue a draft: give it the next number of the issue year (no gaps, no
    duplicates, even under concurrent issuing), set issued_at and the due date
    from its net terms, publish ``invoice.issued`` and, after commit, queue the
    email with the PDF. Idempotent: an issued or paid invoice is returned as is.
    Raises Conflict for a void invoice and InvalidRequest for an empty one."""
    now = now or timezone.now()
    with transaction.atomic():
        invoice = lock_invoice(invoice_id)
        if invoice.status in (Invoice.Status.ISSUED, Invoice.Status.PAID):
            return invoice
        if invoice.status == Invoice.Status.VOID:
            raise Conflict(f"{invoice} is void and cannot be issued.")
        if not invoice.lines.exists():
            raise InvalidRequest(f"{invoice} has no lines.", details={"lines": "add at least one line"})
        if invoice.total < 0:
            raise InvalidRequest(f"{invoice} totals {invoice.total}; an invoice cannot be negative.",
                                 details={"total": "must be >= 0"})
        year = timezone.localtime(now).year
        sequence = _next_number(year)
        invoice.year, invoice.sequence = year, sequence
        invoice.number = NUMBER_FORMAT.format(year=year, sequence=sequence)
        invoice.status = Invoice.Status.ISSUED
        invoice.issued_at = now
        invoice.due_at = now + timedelta(days=invoice.net_terms_days)
        fields = ["year", "sequence", "number", "status", "issued_at", "due_at"]
        if invoice.total == 0:
            invoice.status, invoice.paid_at = Invoice.Status.PAID, now
            fields.append("paid_at")
        invoice.save(update_fields=fields)
        audit_record(actor=actor, actor_label=actor_label, action="invoice.issue", obj=invoice,
                     changes={"number": invoice.number, "total": invoice.total})
        events.publish("invoice.issued", {"invoice": invoice.pk, "number": invoice.number,
                                          "customer": invoice.customer_id, "total": str(invoice.total),
                                          "currency": invoice.currency})
        if invoice.status == Invoice.Status.PAID:
            _activate_paid_grants(invoice, actor=actor, actor_label=actor_label)
        if invoice.billing_email:
            transaction.on_commit(lambda: _queue_email(invoice.pk))
    return invoice


def _queue_email(invoice_id: int) -> None:
    from billing.tasks import invoice_email_send

    invoice_email_send.delay(invoice_id)


def invoice_void(*, invoice_id: int, reason: str, actor=None, actor_label: str = "") -> Invoice:
    """Void a draft or an unpaid issued invoice (its number stays used). Grants
    waiting for its payment are voided with it. Idempotent for a void invoice;
    Conflict once any payment was recorded."""
    if not reason.strip():
        raise InvalidRequest("Say why the invoice is voided.", details={"reason": "required"})
    with transaction.atomic():
        invoice = lock_invoice(invoice_id)
        if invoice.status == Invoice.Status.VOID:
            return invoice
        if invoice.status == Invoice.Status.PAID or invoice.amount_paid > 0:
            raise Conflict(f"{invoice} has payments; refund or credit it instead of voiding.")
        invoice.status = Invoice.Status.VOID
        invoice.voided_at = timezone.now()
        invoice.void_reason = reason[:500]
        invoice.save(update_fields=["status", "voided_at", "void_reason"])
        for grant_id in _pending_grant_ids(invoice):
            grant_void(grant_id=grant_id, actor=actor, actor_label=actor_label, reason=f"{invoice} voided: {reason}")
        audit_record(actor=actor, actor_label=actor_label, action="invoice.void", obj=invoice,
                     changes={"reason": reason})
        events.publish("invoice.voided", {"invoice": invoice.pk, "number": invoice.number})
        _refresh_subscription(invoice)
    return invoice


def _refresh_subscription(invoice: Invoice) -> None:
    """A period invoice paid or voided may end its subscription's ``past_due``."""
    from billing.services.plans import subscription_refresh_status  # plans builds on this module

    subscription_id = (SubscriptionPeriod.objects.filter(invoice=invoice)
                       .values_list("subscription_id", flat=True).first())
    if subscription_id is not None:
        subscription_refresh_status(subscription_id=subscription_id)


def _pending_grant_ids(invoice: Invoice) -> list[int]:
    return sorted(
        CreditGrant.objects.filter(
            purchase__invoice_lines__invoice=invoice, status=CreditGrant.Status.PENDING_PAYMENT,
        ).values_list("pk", flat=True)
    )


def _activate_paid_grants(invoice: Invoice, *, actor, actor_label: str) -> None:
    for grant_id in _pending_grant_ids(invoice):
        grant_activate_paid(grant_id=grant_id, actor=actor, actor_label=actor_label,
                            reference=f"invoice:{invoice.number}")


def payment_record(
    *, invoice_id: int, amount: Decimal, method: str = Payment.Method.MANUAL, reference: str = "",
    provider_event_id: str | None = None, received_at: datetime | None = None, currency: str | None = None,
    actor=None, actor_label: str = "",
) -> Payment:
    """Record money received against an issued invoice (full or partial). When
    the invoice is fully paid it turns ``paid`` and every grant waiting for it in
    ``pending_payment`` becomes usable (``grant_activate_paid``).

    Idempotent on ``provider_event_id``: a replay returns the first payment.
    Raises Conflict for drafts, void or already-paid invoices and for more than
    is due; InvalidRequest for a wrong currency or a non-positive amount."""
    if provider_event_id:
        existing = Payment.objects.filter(provider_event_id=provider_event_id).first()
        if existing is not None:
            return existing
    try:
        with transaction.atomic():
            invoice = lock_invoice(invoice_id)
            if provider_event_id:
                # A concurrent delivery of the same event may have committed while we waited for the lock.
                existing = Payment.objects.filter(provider_event_id=provider_event_id).first()
                if existing is not None:
                    return existing
            if currency and currency.upper() != invoice.currency:
                raise InvalidRequest(f"{invoice} is in {invoice.currency}, not {currency}.",
                                     details={"currency": f"must be {invoice.currency}"})
            amount = Decimal(amount)
            if amount != round_money(amount, invoice.currency) or amount <= 0:
                raise InvalidRequest(f"Pay a positive amount in whole {invoice.currency} minor units.",
                                     details={"amount": "must be > 0 with the currency's decimals"})
            if invoice.status != Invoice.Status.ISSUED:
                raise Conflict(f"{invoice} is {invoice.status}; payments are recorded on issued invoices.")
            if amount > invoice.amount_due:
                raise Conflict(f"{invoice} has {invoice.amount_due} {invoice.currency} due; {amount} is more.",
                               details={"amount_due": str(invoice.amount_due)})
            payment = Payment.objects.create(
                invoice=invoice, amount=amount, currency=invoice.currency, method=method, reference=reference,
                provider_event_id=provider_event_id or None, received_at=received_at or timezone.now(),
                recorded_by=actor if getattr(actor, "is_authenticated", False) else None,
            )
            invoice.amount_paid += amount
            fields = ["amount_paid"]
            if invoice.amount_paid == invoice.total:
                invoice.status, invoice.paid_at = Invoice.Status.PAID, payment.received_at
                fields += ["status", "paid_at"]
            invoice.save(update_fields=fields)
            audit_record(actor=actor, actor_label=actor_label, action="invoice.payment", obj=invoice,
                         changes={"amount": amount, "method": method, "reference": reference,
                                  "provider_event_id": provider_event_id})
            events.publish("invoice.payment_recorded", {
                "invoice": invoice.pk, "number": invoice.number, "amount": str(amount), "status": invoice.status})
            if invoice.status == Invoice.Status.PAID:
                _activate_paid_grants(invoice, actor=actor, actor_label=actor_label)
                events.publish("invoice.paid", {"invoice": invoice.pk, "number": invoice.number})
                _refresh_subscription(invoice)
    except IntegrityError:
        existing = Payment.objects.filter(provider_event_id=provider_event_id).first() if provider_event_id else None
        if existing is None:
            raise
        return existing
    return payment


def invoice_payment_failed(*, invoice_id: int, reason: str = "", actor=None, actor_label: str = "") -> Invoice:
    """The provider reports that paying an issued invoice failed: nothing about
    the invoice changes (it stays issued and due), but ``invoice.payment_failed``
    is published with the grants still waiting for its payment, so other apps
    react (alerts counts a failed auto top-up and may switch it off). Callers
    deduplicate redeliveries (the webhook does, by its event id). Raises
    Conflict unless the invoice is issued."""
    with transaction.atomic():
        invoice = lock_invoice(invoice_id)
        if invoice.status != Invoice.Status.ISSUED:
            raise Conflict(f"{invoice} is {invoice.status}; only an issued invoice can fail to be paid.",
                           details={"status": invoice.status})
        reason = (reason or "Payment failed.")[:255]
        audit_record(actor=actor, actor_label=actor_label, action="invoice.payment_failed", obj=invoice,
                     changes={"reason": reason})
        events.publish("invoice.payment_failed", {
            "invoice": invoice.pk, "number": invoice.number, "customer": invoice.customer_id, "reason": reason,
            "grants": _pending_grant_ids(invoice)})
    return invoice


def pack_purchase_invoice(*, purchase_id: int, issue: bool = True, actor=None, actor_label: str = "") -> Invoice:
    """Invoice a pack purchase: one ``pack_purchase`` line at the price paid.
    Its grant (bought with ``pending_payment=True``) becomes usable when the
    invoice is paid. Idempotent: a purchase already on a live invoice returns it."""
    with transaction.atomic():
        purchase = PackPurchase.objects.select_for_update(of=("self",)).select_related("pack", "customer").get(
            pk=purchase_id)
        existing = Invoice.objects.filter(lines__pack_purchase=purchase).exclude(status=Invoice.Status.VOID).first()
        if existing is not None:
            return existing
        invoice = invoice_create_draft(customer=purchase.customer, currency=purchase.currency, actor=actor,
                                       actor_label=actor_label)
        invoice_add_line(
            invoice_id=invoice.pk, kind=InvoiceLine.Kind.PACK_PURCHASE,
            description=f"{purchase.quantity} × {purchase.pack.name} ({purchase.credits.normalize():f} credits)",
            quantity=Decimal(purchase.quantity), unit_price=purchase.total_price / purchase.quantity,
            pack_purchase=purchase, actor=actor, actor_label=actor_label,
        )
        if issue:
            invoice = invoice_issue(invoice_id=invoice.pk, actor=actor, actor_label=actor_label)
    return invoice


def invoice_email_send(*, invoice_id: int) -> bool:
    """Email an issued invoice to its billing email with the PDF attached, once:
    the invoice row is locked while sending and ``emailed_at`` set after, so a
    rerun (or a second worker) sends nothing more. True when sent now."""
    from billing.invoice_document import invoice_document, render_pdf

    with transaction.atomic():
        invoice = lock_invoice(invoice_id)
        if invoice.emailed_at is not None or invoice.status == Invoice.Status.DRAFT or not invoice.billing_email:
            return False
        document_email(invoice, doc=invoice_document(invoice), body_template="billing/invoices/email.txt",
                       pdf=render_pdf(invoice), action="invoice.email")
    return True


def document_email(row, *, doc, body_template: str, pdf: bytes, action: str) -> None:
    """Send a document (invoice, credit note) to ``row.billing_email`` with its
    PDF attached, then set ``row.emailed_at`` and audit ``action``. The caller
    holds the row's lock inside its transaction, so the row is emailed once."""
    from django.core.mail import EmailMessage
    from django.template.loader import render_to_string

    message = EmailMessage(subject=f"{doc.title} from {doc.seller}",
                           body=render_to_string(body_template, {"doc": doc}), to=[row.billing_email])
    message.attach(f"{row.number}.pdf", pdf, "application/pdf")
    message.send()
    row.emailed_at = timezone.now()
    row.save(update_fields=["emailed_at"])
    audit_record(action=action, obj=row, changes={"to": row.billing_email})
