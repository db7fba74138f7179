"""Reservations: hold credits for a long job, then capture (one usage charge) or release.

A hold counts against available balance while it is open and unexpired; an
expired hold never blocks, even before ``reservations_expire_due`` marks it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from billing.errors import Conflict, IdempotencyConflict, InsufficientCredits, InvalidRequest, NotFound
from billing.models import CreditGrant, Customer, Feature, FeatureCost, Reservation
from billing.numbers import ZERO, round_credits
from billing.services.ledger import headroom, open_holds_total
from billing.services.locks import lock_grants, lock_reservation, lock_wallet
from billing.services.usage import ChargeRequest, ChargeResult, usage_charge

CREDITS_FEATURE_KEY = "credits"


def reservation_create(
    *, customer: Customer, wallet_id: int, amount: Decimal | None = None, feature: Feature | None = None,
    quantity: Decimal | None = None, ttl_seconds: int | None = None, idempotency_key: str | None = None,
    now: datetime | None = None,
) -> Reservation:
    """Hold ``amount`` credits (or ``quantity`` of ``feature`` at today's cost).

    Locks the wallet's usable grants and the wallet; raises InsufficientCredits
    when the hold does not fit the available balance. Idempotent per wallet and
    ``idempotency_key``: a replay returns the first hold, whatever its state now;
    the same key for another amount or feature raises IdempotencyConflict."""
    now = now or timezone.now()
    ttl = settings.CREDITDESK_DEFAULT_HOLD_TTL_SECONDS if ttl_seconds is None else ttl_seconds
    if not 1 <= ttl <= settings.CREDITDESK_MAX_HOLD_TTL_SECONDS:
        raise InvalidRequest("ttl_seconds is out of range.",
                             details={"ttl_seconds": f"must be 1..{settings.CREDITDESK_MAX_HOLD_TTL_SECONDS}"})
    if amount is None:
        if feature is None or quantity is None:
            raise InvalidRequest("Give an amount, or a feature and a quantity.",
                                 details={"amount": "required unless feature and quantity are given"})
        rate = FeatureCost.objects.effective(feature_id=feature.pk, at=now, customer_id=customer.pk)
        if rate is None:
            raise InvalidRequest(f"Feature {feature.key!r} has no credit cost now.", details={"feature": feature.key})
        amount = round_credits(quantity * rate.credits_per_unit)
    amount = round_credits(amount)
    if amount <= 0:
        raise InvalidRequest("A hold must be for more than zero credits.", details={"amount": "must be > 0"})
    with transaction.atomic():
        grant_ids = (
            CreditGrant.objects.filter(wallet_id=wallet_id).usable(at=now, feature_id=feature.pk if feature else None)
            .values_list("pk", flat=True)
        )
        grants = lock_grants(grant_ids)
        wallet = lock_wallet(wallet_id)
        if idempotency_key:
            existing = Reservation.objects.filter(wallet=wallet, idempotency_key=idempotency_key).first()
            if existing is not None:
                if (existing.amount, existing.feature_id) != (amount, feature.pk if feature else None):
                    raise IdempotencyConflict(
                        f"Idempotency key {idempotency_key!r} was already used for a different hold.",
                        details={"idempotency_key": idempotency_key, "reservation": existing.pk},
                    )
                return existing
        usable = sum((g.remaining for g in grants.values() if g.is_usable(now, feature.pk if feature else None)), ZERO)
        available = usable - open_holds_total(wallet, at=now) + headroom(wallet)
        if amount > available:
            raise InsufficientCredits(
                f"The wallet has {max(available, ZERO)} credits available; the hold needs {amount}.",
                details={"required": str(amount), "available": str(max(available, ZERO))},
            )
        return Reservation.objects.create(
            wallet=wallet, customer=customer, feature=feature, quantity=quantity, amount=amount,
            expires_at=now + timedelta(seconds=ttl), idempotency_key=idempotency_key, created_at=now,
        )


def reservation_capture(
    *, reservation: Reservation, event_id: str, quantity: Decimal | None = None, amount: Decimal | None = None,
    properties: dict | None = None, now: datetime | None = None,
) -> ChargeResult:
    """Charge the actual usage of a held job and close the hold, in one transaction.

    ``quantity`` is priced by the hold's feature; ``amount`` charges credits as
    they are, through the built-in ``credits`` feature (1 credit per unit).
    The hold stops counting whatever the captured amount; a capture that does
    not fit the rest of the balance is refused (402) and the hold stays open."""
    feature = reservation.feature
    if amount is not None:
        feature = Feature.objects.filter(key=CREDITS_FEATURE_KEY).first()
        if feature is None:
            raise NotFound("The built-in 'credits' feature is missing; run the migrations.")
        quantity = amount
    elif quantity is None:
        raise InvalidRequest("Give the quantity (or amount) to capture.", details={"quantity": "required"})
    elif feature is None:
        raise InvalidRequest("This hold was made by amount: capture an amount.", details={"quantity": "use amount"})
    return usage_charge(
        ChargeRequest(customer=reservation.customer, wallet_id=reservation.wallet_id, feature=feature,
                      quantity=quantity, event_id=event_id, properties=properties or {},
                      reservation_id=reservation.pk),
        now=now,
    )


def reservation_release(*, reservation_id: int, now: datetime | None = None) -> Reservation:
    """Release an open hold. Releasing a released or expired one is a no-op; a captured one is a conflict."""
    now = now or timezone.now()
    with transaction.atomic():
        reservation = Reservation.objects.filter(pk=reservation_id).first()
        if reservation is None:
            raise NotFound("No such reservation.")
        lock_wallet(reservation.wallet_id)
        reservation = lock_reservation(reservation_id)
        if reservation.status == Reservation.Status.CAPTURED:
            raise Conflict("The reservation was captured; there is nothing to release.")
        if reservation.status == Reservation.Status.OPEN:
            reservation.status = Reservation.Status.RELEASED if reservation.expires_at > now else (
                Reservation.Status.EXPIRED)
            reservation.closed_at = now
            reservation.save(update_fields=["status", "closed_at"])
    return reservation


def reservations_expire_due(*, now: datetime | None = None) -> int:
    """Mark open holds past their expiry as expired (they already stopped counting). Idempotent."""
    now = now or timezone.now()
    return Reservation.objects.filter(Q(status=Reservation.Status.OPEN) & Q(expires_at__lte=now)).update(
        status=Reservation.Status.EXPIRED, closed_at=now
    )
