"""Selling credit packs: a purchase record and the prepaid (or promotional) grant it creates."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.utils import timezone

from billing.errors import IdempotencyConflict, InvalidRequest
from billing.models import CreditGrant, CreditPack, PackPurchase, Wallet
from billing.numbers import round_credits, round_money
from billing.services.audit import audit_record
from billing.services.grants import grant_create


def pack_price(*, pack: CreditPack, quantity: int) -> tuple[Decimal, Decimal, Decimal]:
    """(list price, discount percent, total) for ``quantity`` packs, total rounded to the currency."""
    list_price = pack.price * quantity
    discount = pack.discount_for(quantity)
    total = round_money(list_price * (Decimal(100) - discount) / Decimal(100), pack.currency)
    return list_price, discount, total


def pack_purchase(
    *, wallet: Wallet, pack: CreditPack, quantity: int = 1, purchased_by=None, actor_label: str = "",
    idempotency_key: str | None = None, source: str = CreditGrant.Source.PACK_PURCHASE,
    pending_payment: bool = False, require_approval: bool = False,
) -> PackPurchase:
    """Sell ``quantity`` packs: one grant of pack.credits × quantity whose cost
    basis is the price paid ÷ credits, expiring after the pack's validity.
    With ``require_approval`` the grant waits in ``pending_approval`` (nothing
    usable until finance approves); the purchase record exists at once.
    Idempotent on ``idempotency_key``: a replay returns the first purchase; the
    same key for another wallet, pack or quantity raises IdempotencyConflict."""
    if not pack.active:
        raise InvalidRequest(f"Pack {pack.code!r} is no longer sold.", details={"pack": pack.code})
    if quantity < 1:
        raise InvalidRequest("Buy at least one pack.", details={"quantity": "must be >= 1"})
    if idempotency_key:
        existing = PackPurchase.objects.filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return _replayed(existing, wallet=wallet, pack=pack, quantity=quantity)
    list_price, discount, total = pack_price(pack=pack, quantity=quantity)
    credits = round_credits(pack.credits * quantity)
    now = timezone.now()
    try:
        with transaction.atomic():
            grant = grant_create(
                wallet=wallet, kind=pack.kind, amount=credits, source=source,
                expires_at=now + timedelta(days=pack.validity_days) if pack.validity_days else None,
                effective_at=now, priority=pack.priority, price_paid=total, currency=pack.currency,
                reason=f"{quantity} × {pack.name}", requested_by=purchased_by, actor_label=actor_label,
                require_approval=require_approval, pending_payment=pending_payment,
                idempotency_key=f"pack:{idempotency_key}" if idempotency_key else None,
            )
            purchase = PackPurchase.objects.create(
                customer=wallet.customer, wallet=wallet, pack=pack, quantity=quantity, credits=credits,
                list_price=list_price, discount_percent=discount, total_price=total, currency=pack.currency,
                grant=grant, idempotency_key=idempotency_key,
                purchased_by=purchased_by if getattr(purchased_by, "is_authenticated", False) else None,
            )
            audit_record(actor=purchased_by, actor_label=actor_label, action="pack.purchase", obj=purchase,
                         changes={"pack": pack.code, "quantity": quantity, "total": total})
    except IntegrityError:
        existing = PackPurchase.objects.filter(idempotency_key=idempotency_key).first() if idempotency_key else None
        if existing is None:
            raise
        return _replayed(existing, wallet=wallet, pack=pack, quantity=quantity)
    return purchase


def _replayed(existing: PackPurchase, *, wallet: Wallet, pack: CreditPack, quantity: int) -> PackPurchase:
    if (existing.wallet_id, existing.pack_id, existing.quantity) != (wallet.pk, pack.pk, quantity):
        raise IdempotencyConflict(
            f"Idempotency key {existing.idempotency_key!r} was already used for a different purchase.",
            details={"idempotency_key": existing.idempotency_key, "purchase": existing.pk},
        )
    return existing
