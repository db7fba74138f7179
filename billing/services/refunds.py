"""Refunds of unused prepaid credits (issue 4): request → approval by someone
else → a ``refund`` ledger entry taking the credits out of the grant, a credit
note and the deferred revenue reversed (``billing.services.revenue``).

Every function runs in one transaction and raises ``BillingError``. Lock
order: the refund request row, then the grant, then the wallet
(``billing.services.locks``), then the credit-note number of the year (an
advisory lock), so numbers run CN-<year>-000001.. without gaps: a rolled-back
approval gives its number back.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from billing import events
from billing.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from billing.models import CreditGrant, CreditNote, Invoice, LedgerEntry, RefundRequest
from billing.numbers import ZERO, round_credits, round_money
from billing.services.audit import audit_record
from billing.services.invoices import billing_profile, document_email
from billing.services.ledger import Movement, append_entries, watch_balance
from billing.services.locks import lock_grants, lock_key, lock_wallet
from billing.services.revenue import grant_figures_now, paid_grants

REQUEST_PERMISSION = "billing.add_refundrequest"
APPROVE_PERMISSION = "billing.approve_refundrequest"
NUMBER_FORMAT = "CN-{year}-{sequence:06d}"


def _refundable(grant: CreditGrant, *, now: datetime) -> None:
    if not paid_grants().filter(pk=grant.pk).exists():
        raise Conflict(f"Grant #{grant.pk} was not paid for; only paid prepaid or contract credits are refunded.",
                       code="not_refundable")
    if grant.status != CreditGrant.Status.ACTIVE or grant.remaining <= 0:
        raise Conflict(f"Grant #{grant.pk} is {grant.status} with {grant.remaining} credits left; nothing to refund.",
                       code="not_refundable")
    if grant.expires_at is not None and grant.expires_at <= now:
        raise Conflict(f"Grant #{grant.pk} has expired; its unused credits are breakage, not refundable.",
                       code="not_refundable")


def refund_request(
    *, grant_id: int, credits: Decimal | None, reason: str, requested_by, actor_label: str = "",
) -> RefundRequest:
    """Ask to refund ``credits`` of a paid grant's unused credits (None: all that
    are unused at approval). Nothing moves until another person approves.
    Raises PermissionDenied without the request permission, NotFound, Conflict
    when the grant has nothing refundable or fewer unused credits than asked."""
    if requested_by is None or not requested_by.has_perm(REQUEST_PERMISSION):
        raise PermissionDenied("You may not request refunds.")
    if not reason.strip():
        raise InvalidRequest("Say why the credits are refunded.", details={"reason": "required"})
    if credits is not None:
        credits = round_credits(credits)
        if credits <= 0:
            raise InvalidRequest("Refund more than zero credits.", details={"credits": "must be > 0"})
    with transaction.atomic():
        grant = lock_grants([grant_id]).get(grant_id)
        if grant is None:
            raise NotFound(f"No grant #{grant_id}.")
        _refundable(grant, now=timezone.now())
        if credits is not None and credits > grant.remaining:
            raise Conflict(f"Grant #{grant.pk} has {grant.remaining} unused credits; {credits} is more.",
                           code="over_refund", details={"remaining": str(grant.remaining)})
        refund = RefundRequest.objects.create(grant=grant, credits=credits, reason=reason[:500],
                                              currency=grant.currency, requested_by=requested_by)
        audit_record(actor=requested_by, actor_label=actor_label, action="refund.request", obj=refund,
                     changes={"grant": grant.pk, "credits": credits if credits is not None else "all unused",
                              "reason": reason})
    return refund


def _lock_request(refund_id: int) -> RefundRequest:
    try:
        return RefundRequest.objects.select_for_update(of=("self",)).get(pk=refund_id)
    except RefundRequest.DoesNotExist:
        raise NotFound(f"No refund request #{refund_id}.") from None


def _next_number(year: int) -> int:
    lock_key("credit_note_number", str(year))
    last = CreditNote.objects.filter(year=year).aggregate(last=Max("sequence"))["last"]
    return (last or 0) + 1


def _original_invoice(grant: CreditGrant) -> Invoice | None:
    purchase = getattr(grant, "purchase", None)
    invoices = Invoice.objects.exclude(status__in=(Invoice.Status.DRAFT, Invoice.Status.VOID))
    if purchase is not None:
        return invoices.filter(lines__pack_purchase=purchase).order_by("pk").first()
    instalment = getattr(grant, "contract_instalment", None)
    if instalment is not None and instalment.invoice_id:
        return invoices.filter(pk=instalment.invoice_id).first()
    return None


def _refund_money(grant: CreditGrant, credits: Decimal) -> Decimal:
    """Credits × the grant's cost basis, rounded once; never more than the money
    still deferred, and the refund that empties the grant takes exactly what is
    deferred (within one minor unit of the product), so revenue never drifts."""
    deferred = max(grant_figures_now(grant).deferred, ZERO)
    if credits == grant.remaining:
        return deferred
    return min(round_money(credits * grant.per_unit_cost_basis, grant.currency), deferred)


def refund_approve(*, refund_id: int, user, now: datetime | None = None) -> RefundRequest:
    """Approve a pending refund (maker-checker: never the requester's own) and
    carry it out at once, under the grant and wallet locks: the credits asked
    (or all unused ones) leave the grant through one ``refund`` entry, a credit
    note of credits × the grant's cost basis (``_refund_money``) is numbered,
    issued and emailed (after commit, with its PDF), and ``refund.approved`` is
    published. Raises PermissionDenied, Conflict when the request was decided
    already or the grant has fewer unused credits than asked (checked again here)."""
    with transaction.atomic():
        refund = _lock_request(refund_id)
        if user is None or not user.has_perm(APPROVE_PERMISSION):
            raise PermissionDenied("You may not approve refunds.")
        if refund.requested_by_id == user.pk:
            raise PermissionDenied("You cannot approve a refund you asked for yourself; another approver must.")
        if refund.status != RefundRequest.Status.PENDING_APPROVAL:
            raise Conflict(f"{refund} is {refund.get_status_display().lower()}.")
        grant = lock_grants([refund.grant_id])[refund.grant_id]
        wallet = lock_wallet(grant.wallet_id)
        now = now or timezone.now()
        _refundable(grant, now=now)
        credits = grant.remaining if refund.credits is None else refund.credits
        if credits > grant.remaining:
            raise Conflict(f"Grant #{grant.pk} has only {grant.remaining} unused credits left; "
                           f"the request asks for {credits}.", code="over_refund",
                           details={"remaining": str(grant.remaining)})
        amount = _refund_money(grant, credits)
        was_usable = grant.is_usable(now)
        grant.remaining -= credits
        fields = {"remaining": grant.remaining}
        if grant.remaining == 0:
            fields["status"] = grant.status = CreditGrant.Status.DEPLETED
        CreditGrant.objects.filter(pk=grant.pk).update(**fields)
        [entry] = append_entries(wallet=wallet, movements=[Movement(
            type=LedgerEntry.Type.REFUND, amount=-credits, grant=grant, reference=f"refund:{refund.pk}",
            memo=refund.reason[:500])])
        if was_usable:
            watch_balance(wallet, delta=-credits, cause="refund")
        year = timezone.localtime(entry.created_at).year
        sequence = _next_number(year)
        purchase = getattr(grant, "purchase", None)
        note = CreditNote.objects.create(
            number=NUMBER_FORMAT.format(year=year, sequence=sequence), year=year, sequence=sequence,
            customer_id=wallet.customer_id, grant=grant, refund_request=refund, ledger_entry=entry,
            pack_purchase=purchase, invoice=_original_invoice(grant),
            description=f"Refund of {credits.normalize():f} unused credits of grant #{grant.pk}"
                        + (f" ({purchase.quantity} × {purchase.pack.name})" if purchase else ""),
            credits=credits, unit_price=grant.per_unit_cost_basis, amount=amount, currency=grant.currency,
            reason=refund.reason, issued_at=entry.created_at,
            billing_email=billing_profile(grant.wallet.customer).billing_email or grant.wallet.customer.email,
            created_by=user if getattr(user, "is_authenticated", False) else None,
        )
        if note.billing_email:
            transaction.on_commit(lambda: _queue_email(note.pk))
        refund.status = RefundRequest.Status.REFUNDED
        refund.refunded_credits, refund.amount = credits, amount
        refund.decided_by, refund.decided_at = user, entry.created_at
        refund.save(update_fields=["status", "refunded_credits", "amount", "decided_by", "decided_at"])
        audit_record(actor=user, action="refund.approve", obj=refund,
                     changes={"credits": credits, "amount": amount, "credit_note": note.number})
        events.publish("refund.approved", {
            "refund": refund.pk, "grant": grant.pk, "wallet": wallet.pk, "customer": wallet.customer_id,
            "credits": str(credits), "amount": str(amount), "currency": grant.currency,
            "credit_note": note.number})
    return refund


def _queue_email(credit_note_id: int) -> None:
    from billing.tasks import credit_note_email_send

    credit_note_email_send.delay(credit_note_id)


def credit_note_email_send(*, credit_note_id: int) -> bool:
    """Email a credit note to its billing email with the PDF attached, once: the
    note's row is locked while sending and ``emailed_at`` set after, so a rerun
    (or a second worker) sends nothing more. True when sent now."""
    from billing.credit_note_document import credit_note_document, render_pdf

    with transaction.atomic():
        note = CreditNote.objects.select_for_update(of=("self",)).select_related("customer", "invoice").get(
            pk=credit_note_id)
        if note.emailed_at is not None or not note.billing_email:
            return False
        document_email(note, doc=credit_note_document(note), body_template="billing/credit_notes/email.txt",
                       pdf=render_pdf(note), action="credit_note.email")
    return True


def refund_reject(*, refund_id: int, user, reason: str = "") -> RefundRequest:
    """Reject a pending refund: nothing else changes. Raises PermissionDenied
    without the approve permission, Conflict once decided."""
    with transaction.atomic():
        refund = _lock_request(refund_id)
        if user is None or not user.has_perm(APPROVE_PERMISSION):
            raise PermissionDenied("You may not reject refunds.")
        if refund.status != RefundRequest.Status.PENDING_APPROVAL:
            raise Conflict(f"{refund} is {refund.get_status_display().lower()}.")
        refund.status = RefundRequest.Status.REJECTED
        refund.decided_by, refund.decided_at = user, timezone.now()
        refund.decision_note = reason[:500]
        refund.save(update_fields=["status", "decided_by", "decided_at", "decision_note"])
        audit_record(actor=user, action="refund.reject", obj=refund, changes={"reason": reason})
    return refund
