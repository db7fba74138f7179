"""Customers, wallets and grants: creating credits, approving, voiding, expiring.

Every function runs in one transaction, takes row locks through
``billing.services.locks`` (grants before wallet) and raises ``BillingError``.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing import events
from billing.errors import Conflict, IdempotencyConflict, InvalidRequest, NotFound, PermissionDenied
from billing.models import Adjustment, CreditGrant, Customer, LedgerEntry, Wallet
from billing.numbers import ZERO, round_credits, round_rate
from billing.services.audit import audit_record
from billing.services.ledger import (
    Movement,
    allocate,
    append_entries,
    debit_grants,
    settle_overage,
    watch_balance,
)
from billing.services.locks import lock_grants, lock_wallet

APPROVE_PERMISSION = "billing.approve_creditgrant"
# Sources whose grants are not backed by a payment record: big ones need a second person.
UNPAID_SOURCES = {
    CreditGrant.Source.MANUAL,
    CreditGrant.Source.API,
    CreditGrant.Source.PROMOTION,
    CreditGrant.Source.REFERRAL,
}


def customer_create(
    *, external_id: str, name: str, email: str = "", currency: str = "USD", timezone_name: str = "UTC",
    policy: str = Wallet.Policy.BLOCK, credit_limit: Decimal = ZERO, actor=None,
) -> Customer:
    """Create a customer with its default wallet. Raises Conflict if the external id exists."""
    try:
        with transaction.atomic():
            customer = Customer.objects.create(
                external_id=external_id, name=name, email=email, currency=currency, timezone=timezone_name
            )
            Wallet.objects.create(customer=customer, is_default=True, policy=policy, credit_limit=credit_limit)
            audit_record(actor=actor, action="customer.create", obj=customer)
    except IntegrityError:
        raise Conflict(
            f"A customer with external_id {external_id!r} exists.", details={"external_id": external_id}
        ) from None
    return customer


def default_wallet(customer: Customer) -> Wallet:
    wallet = Wallet.objects.filter(customer=customer, is_default=True).first()
    if wallet is None:
        raise NotFound(f"Customer {customer.external_id!r} has no default wallet.")
    return wallet


def _activate(*, grant: CreditGrant, wallet: Wallet, reference: str) -> None:
    """Credit an active grant to its locked wallet: the grant entry, then overage
    repayment — only from a grant usable now for any feature (a feature-scoped or
    not-yet-effective grant may not pay for earlier usage, DESIGN.md §4.3)."""
    movements = [
        Movement(
            type=LedgerEntry.Type.GRANT, amount=grant.original_amount, grant=grant, reference=reference,
            idempotency_key=grant.idempotency_key or "", memo=grant.reason[:500],
        )
    ]
    settled, overage_delta = (
        settle_overage(wallet=wallet, grant=grant, reference=reference)
        if grant.is_usable(timezone.now()) else ([], ZERO)
    )
    append_entries(wallet=wallet, movements=movements + settled, overage_delta=overage_delta)
    if wallet.status == Wallet.Status.PAUSED:
        Wallet.objects.filter(pk=wallet.pk).update(status=Wallet.Status.ACTIVE, paused_reason="")
        wallet.status, wallet.paused_reason = Wallet.Status.ACTIVE, ""
        events.publish("wallet.resumed", {"wallet": wallet.pk, "customer": wallet.customer_id, "grant": grant.pk})
    if grant.is_usable():
        watch_balance(wallet, delta=grant.original_amount, cause="grant")
    events.publish(
        "grant.activated",
        {"grant": grant.pk, "wallet": wallet.pk, "customer": wallet.customer_id, "kind": grant.kind,
         "amount": str(grant.original_amount)},
    )


def grant_create(
    *, wallet: Wallet, kind: str, amount: Decimal, source: str = CreditGrant.Source.MANUAL,
    expires_at: datetime | None = None, effective_at: datetime | None = None, priority: int = 50,
    price_paid: Decimal = ZERO, currency: str | None = None, feature=None, reason: str = "",
    requested_by=None, actor_label: str = "", idempotency_key: str | None = None,
    require_approval: bool | None = None, pending_payment: bool = False,
) -> CreditGrant:
    """Create a grant. Active grants write their ``grant`` entry (and repay
    outstanding overage) at once; grants above CREDITDESK_GRANT_APPROVAL_THRESHOLD
    from unpaid sources (or with ``require_approval``) wait in ``pending_approval``.

    Idempotent per wallet and ``idempotency_key``: a second call returns the first
    grant; the same key with a different kind, amount, source, priority, price or
    feature raises IdempotencyConflict (timestamps are not compared: retries
    recompute them).
    """
    amount = round_credits(amount)
    if amount <= 0:
        raise InvalidRequest("A grant must add more than zero credits.", details={"amount": "must be > 0"})
    if kind not in CreditGrant.Kind.values:
        raise InvalidRequest(f"Unknown grant kind {kind!r}.", details={"kind": f"one of {CreditGrant.Kind.values}"})
    if not 0 <= priority <= 100:
        raise InvalidRequest("Priority runs from 0 to 100.", details={"priority": "must be within 0..100"})
    now = timezone.now()
    effective_at = effective_at or now
    if expires_at is not None and expires_at <= effective_at:
        raise InvalidRequest("A grant must expire after it takes effect.", details={"expires_at": "must be later"})
    if price_paid < 0:
        raise InvalidRequest("Price paid cannot be negative.", details={"price_paid": "must be >= 0"})
    if kind == CreditGrant.Kind.PROMOTIONAL and price_paid > 0:
        raise InvalidRequest("Promotional credits are free.", details={"price_paid": "must be 0 for promotional"})
    if require_approval is None:
        require_approval = source in UNPAID_SOURCES and amount > settings.CREDITDESK_GRANT_APPROVAL_THRESHOLD
    if require_approval:
        status = CreditGrant.Status.PENDING_APPROVAL
    elif pending_payment:
        status = CreditGrant.Status.PENDING_PAYMENT
    else:
        status = CreditGrant.Status.ACTIVE

    with transaction.atomic():
        locked_wallet = lock_wallet(wallet.pk)
        if idempotency_key:
            existing = CreditGrant.objects.filter(wallet=locked_wallet, idempotency_key=idempotency_key).first()
            if existing is not None:
                asked = (kind, amount, source, priority, price_paid, feature.pk if feature else None)
                if asked != (existing.kind, existing.original_amount, existing.source, existing.priority,
                             existing.price_paid, existing.feature_id):
                    raise IdempotencyConflict(
                        f"Idempotency key {idempotency_key!r} was already used for a different grant.",
                        details={"idempotency_key": idempotency_key, "grant": existing.pk},
                    )
                return existing
        grant = CreditGrant.objects.create(
            wallet=locked_wallet, kind=kind, source=source, original_amount=amount,
            remaining=amount if status == CreditGrant.Status.ACTIVE else ZERO,
            per_unit_cost_basis=round_rate(price_paid / amount) if price_paid else ZERO,
            price_paid=price_paid, currency=currency or locked_wallet.customer.currency,
            effective_at=effective_at, expires_at=expires_at, priority=priority, status=status,
            feature=feature, reason=reason, idempotency_key=idempotency_key, requested_by=_user(requested_by),
        )
        if status == CreditGrant.Status.ACTIVE:
            _activate(grant=grant, wallet=locked_wallet, reference=f"grant:{grant.pk}")
        audit_record(
            actor=requested_by, actor_label=actor_label, action="grant.create", obj=grant,
            changes={"kind": kind, "amount": amount, "status": status, "reason": reason},
        )
    return grant


def _user(user):
    return user if user is not None and getattr(user, "is_authenticated", False) else None


def _check_approver(*, user, requested_by_id: int | None, what: str) -> None:
    if user is None or not user.has_perm(APPROVE_PERMISSION):
        raise PermissionDenied(f"You may not approve {what}.")
    if requested_by_id is not None and requested_by_id == user.pk:
        raise PermissionDenied(f"You cannot approve {what} you asked for yourself; another approver must.")


def grant_approve(*, grant_id: int, user) -> CreditGrant:
    """Approve a pending grant (maker-checker: never the requester's own) and credit it."""
    with transaction.atomic():
        grant = lock_grants([grant_id]).get(grant_id)
        if grant is None:
            raise NotFound("No such grant.")
        _check_approver(user=user, requested_by_id=grant.requested_by_id, what="this grant")
        if grant.status != CreditGrant.Status.PENDING_APPROVAL:
            raise Conflict(f"Grant #{grant.pk} is {grant.status}, not pending approval.")
        wallet = lock_wallet(grant.wallet_id)
        now = timezone.now()
        if grant.expires_at is not None and grant.expires_at <= now:
            raise Conflict(f"Grant #{grant.pk} expired before it was approved; reject it and grant again.")
        grant.status = CreditGrant.Status.ACTIVE
        grant.remaining = grant.original_amount
        grant.approved_by = user
        grant.decided_at = now
        grant.save(update_fields=["status", "remaining", "approved_by", "decided_at"])
        _activate(grant=grant, wallet=wallet, reference=f"grant:{grant.pk}")
        audit_record(actor=user, action="grant.approve", obj=grant)
    return grant


def grant_activate_paid(*, grant_id: int, actor=None, actor_label: str = "", reference: str = "") -> CreditGrant:
    """Make a grant waiting in ``pending_payment`` usable once its invoice is paid:
    the grant entry is written (and overage repaid) under the grant and wallet
    locks, and ``grant.activated`` is published. Idempotent: an already active
    grant is returned unchanged. Raises Conflict for any other status."""
    with transaction.atomic():
        grant = lock_grants([grant_id]).get(grant_id)
        if grant is None:
            raise NotFound("No such grant.")
        if grant.status == CreditGrant.Status.ACTIVE:
            return grant
        if grant.status != CreditGrant.Status.PENDING_PAYMENT:
            raise Conflict(f"Grant #{grant.pk} is {grant.status}, not pending payment.")
        wallet = lock_wallet(grant.wallet_id)
        grant.status = CreditGrant.Status.ACTIVE
        grant.remaining = grant.original_amount
        grant.decided_at = timezone.now()
        grant.save(update_fields=["status", "remaining", "decided_at"])
        _activate(grant=grant, wallet=wallet, reference=reference or f"grant:{grant.pk}")
        audit_record(actor=actor, actor_label=actor_label, action="grant.activate_paid", obj=grant,
                     changes={"reference": reference})
    return grant


def grant_reject(*, grant_id: int, user, reason: str = "") -> CreditGrant:
    """Reject a pending grant; it never becomes usable."""
    with transaction.atomic():
        grant = lock_grants([grant_id]).get(grant_id)
        if grant is None:
            raise NotFound("No such grant.")
        if user is None or not user.has_perm(APPROVE_PERMISSION):
            raise PermissionDenied("You may not reject grants.")
        if grant.status != CreditGrant.Status.PENDING_APPROVAL:
            raise Conflict(f"Grant #{grant.pk} is {grant.status}, not pending approval.")
        grant.status = CreditGrant.Status.REJECTED
        grant.approved_by = user
        grant.decided_at = timezone.now()
        grant.save(update_fields=["status", "approved_by", "decided_at"])
        audit_record(actor=user, action="grant.reject", obj=grant, changes={"reason": reason})
    return grant


def grant_void(*, grant_id: int, actor=None, actor_label: str = "", reason: str = "") -> CreditGrant:
    """Void a grant: its remaining credits leave through one ``void`` entry. Idempotent."""
    with transaction.atomic():
        grant = lock_grants([grant_id]).get(grant_id)
        if grant is None:
            raise NotFound("No such grant.")
        if grant.status == CreditGrant.Status.VOIDED:
            return grant
        if grant.status in (CreditGrant.Status.EXPIRED, CreditGrant.Status.REJECTED):
            raise Conflict(f"Grant #{grant.pk} is {grant.status}; there is nothing left to void.")
        wallet = lock_wallet(grant.wallet_id)
        remaining = grant.remaining
        if remaining > 0:
            grant.remaining = ZERO
            CreditGrant.objects.filter(pk=grant.pk).update(remaining=ZERO)
            was_usable = grant.is_usable()
            append_entries(
                wallet=wallet,
                movements=[Movement(type=LedgerEntry.Type.VOID, amount=-remaining, grant=grant,
                                    reference=f"grant:{grant.pk}", memo=reason[:500])],
            )
            if was_usable:
                watch_balance(wallet, delta=-remaining, cause="void")
        grant.status = CreditGrant.Status.VOIDED
        grant.save(update_fields=["status"])
        audit_record(actor=actor, actor_label=actor_label, action="grant.void", obj=grant,
                     changes={"voided_credits": remaining, "reason": reason})
        events.publish("grant.voided", {"grant": grant.pk, "wallet": wallet.pk, "credits": str(remaining)})
    return grant


def grant_extend_expiry(*, grant_id: int, expires_at: datetime | None, actor=None, reason: str = "") -> CreditGrant:
    """Move a usable grant's expiry later (or remove it); the change shows in the
    ledger as a zero-amount ``expiry_change`` entry."""
    with transaction.atomic():
        grant = lock_grants([grant_id]).get(grant_id)
        if grant is None:
            raise NotFound("No such grant.")
        now = timezone.now()
        if grant.status not in (CreditGrant.Status.ACTIVE, CreditGrant.Status.PENDING_APPROVAL,
                                CreditGrant.Status.PENDING_PAYMENT):
            raise Conflict(f"Grant #{grant.pk} is {grant.status}; only live grants can be extended.")
        if grant.expires_at is not None and grant.expires_at <= now:
            raise Conflict(f"Grant #{grant.pk} has already expired.")
        if expires_at is not None and (expires_at <= now or (grant.expires_at and expires_at <= grant.expires_at)):
            raise InvalidRequest("The new expiry must be later than the current one.",
                                 details={"expires_at": "must be later than the current expiry"})
        wallet = lock_wallet(grant.wallet_id)
        before = grant.expires_at
        grant.expires_at = expires_at
        grant.save(update_fields=["expires_at"])
        memo = f"Expiry {before:%Y-%m-%d %H:%M} → {expires_at:%Y-%m-%d %H:%M}" if before and expires_at else (
            f"Expiry {before or 'never'} → {expires_at or 'never'}")
        if reason:
            memo = f"{memo}: {reason}"
        append_entries(wallet=wallet, movements=[Movement(
            type=LedgerEntry.Type.EXPIRY_CHANGE, amount=ZERO, grant=grant, reference=f"grant:{grant.pk}",
            memo=memo[:500])])
        audit_record(actor=actor, action="grant.extend_expiry", obj=grant,
                     changes={"expires_at": [str(before), str(expires_at)], "reason": reason})
    return grant


def grant_expire(*, grant_id: int, now: datetime | None = None) -> bool:
    """Expire one grant whose expiry has passed: remaining credits leave through an
    ``expiry`` entry. Idempotent: a grant already expired is left alone. True if it expired now."""
    now = now or timezone.now()
    with transaction.atomic():
        grant = lock_grants([grant_id]).get(grant_id)
        if grant is None or grant.expires_at is None or grant.expires_at > now:
            return False
        if grant.status != CreditGrant.Status.ACTIVE:
            return False
        wallet = lock_wallet(grant.wallet_id)
        remaining = grant.remaining
        if remaining > 0:
            append_entries(wallet=wallet, movements=[Movement(
                type=LedgerEntry.Type.EXPIRY, amount=-remaining, grant=grant, reference=f"grant:{grant.pk}",
                memo=f"Expired {grant.expires_at:%Y-%m-%d %H:%M} UTC")])
        CreditGrant.objects.filter(pk=grant.pk).update(remaining=ZERO, status=CreditGrant.Status.EXPIRED)
        if remaining > 0:
            watch_balance(wallet, delta=-remaining, cause="expiry")
        events.publish("grant.expired", {"grant": grant.pk, "wallet": wallet.pk, "customer": wallet.customer_id,
                                         "credits": str(remaining), "kind": grant.kind})
    return True


def grants_expire_due(*, now: datetime | None = None, batch_size: int = 500, progress=None) -> int:
    """Expire every grant whose expiry has passed, one transaction per grant, so a
    killed run loses nothing and a rerun picks up where it stopped. Returns the count."""
    now = now or timezone.now()
    due = CreditGrant.objects.filter(status=CreditGrant.Status.ACTIVE, expires_at__lte=now).values_list(
        "pk", flat=True
    )
    expired = 0
    last_pk = 0
    while True:
        ids = list(due.filter(pk__gt=last_pk).order_by("pk")[:batch_size])
        if not ids:
            break
        for grant_id in ids:
            expired += grant_expire(grant_id=grant_id, now=now)
            if progress:
                progress(1)
        last_pk = ids[-1]
    return expired


def adjustment_request(*, wallet: Wallet, amount: Decimal, reason: str, requested_by) -> Adjustment:
    """Ask for a manual correction; it waits for another person's approval."""
    amount = round_credits(amount)
    if amount == 0:
        raise InvalidRequest("An adjustment must change the balance.", details={"amount": "must not be 0"})
    if not reason.strip():
        raise InvalidRequest("Say why.", details={"reason": "required"})
    with transaction.atomic():
        adjustment = Adjustment.objects.create(wallet=wallet, amount=amount, reason=reason, requested_by=requested_by)
        audit_record(actor=requested_by, action="adjustment.request", obj=adjustment,
                     changes={"amount": amount, "reason": reason})
    return adjustment


def adjustment_approve(*, adjustment_id: int, user) -> Adjustment:
    """Apply an adjustment: a positive one becomes an ``adjustment`` grant, a
    negative one takes credits from usable grants in consumption order."""
    with transaction.atomic():
        adjustment = Adjustment.objects.select_for_update().get(pk=adjustment_id)
        _check_approver(user=user, requested_by_id=adjustment.requested_by_id, what="this adjustment")
        if adjustment.status != Adjustment.Status.PENDING_APPROVAL:
            raise Conflict(f"Adjustment #{adjustment.pk} is {adjustment.status}.")
        now = timezone.now()
        if adjustment.amount > 0:
            grant = grant_create(
                wallet=adjustment.wallet, kind=CreditGrant.Kind.ADJUSTMENT, amount=adjustment.amount,
                source=CreditGrant.Source.MANUAL, reason=adjustment.reason, requested_by=adjustment.requested_by,
                require_approval=False, idempotency_key=f"adjustment:{adjustment.pk}",
            )
            CreditGrant.objects.filter(pk=grant.pk).update(approved_by=user, decided_at=now)
            adjustment.grant = grant
        else:
            wanted = -adjustment.amount
            candidates = list(CreditGrant.objects.filter(wallet_id=adjustment.wallet_id).usable(at=now)
                              .values_list("pk", flat=True))
            locked = lock_grants(candidates)
            wallet = lock_wallet(adjustment.wallet_id)
            ordered = list(CreditGrant.objects.filter(pk__in=locked).in_consumption_order())
            allocations, short = allocate(grants=ordered, amount=wanted)
            if short > 0:
                raise Conflict(f"The wallet has only {wanted - short} usable credits; cannot remove {wanted}.")
            movements = debit_grants(allocations=allocations, entry_type=LedgerEntry.Type.ADJUSTMENT,
                                     reference=f"adjustment:{adjustment.pk}", memo=adjustment.reason[:500])
            append_entries(wallet=wallet, movements=movements)
            watch_balance(wallet, delta=adjustment.amount, cause="adjustment")
        adjustment.status = Adjustment.Status.APPLIED
        adjustment.approved_by = user
        adjustment.decided_at = now
        adjustment.save(update_fields=["status", "approved_by", "decided_at", "grant"])
        audit_record(actor=user, action="adjustment.approve", obj=adjustment)
    return adjustment


def adjustment_reject(*, adjustment_id: int, user, reason: str = "") -> Adjustment:
    with transaction.atomic():
        adjustment = Adjustment.objects.select_for_update().get(pk=adjustment_id)
        if user is None or not user.has_perm(APPROVE_PERMISSION):
            raise PermissionDenied("You may not reject adjustments.")
        if adjustment.status != Adjustment.Status.PENDING_APPROVAL:
            raise Conflict(f"Adjustment #{adjustment.pk} is {adjustment.status}.")
        adjustment.status = Adjustment.Status.REJECTED
        adjustment.approved_by = user
        adjustment.decided_at = timezone.now()
        adjustment.save(update_fields=["status", "approved_by", "decided_at"])
        audit_record(actor=user, action="adjustment.reject", obj=adjustment, changes={"reason": reason})
    return adjustment
