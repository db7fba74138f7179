"""Wallet state that is not credits: pausing, resuming, and the alert marks the
balance-crossing hook watches (billing/events.py)."""

from __future__ import annotations

from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from billing import events
from billing.models import Wallet
from billing.services.audit import audit_record
from billing.services.locks import lock_wallet


def wallet_pause(*, wallet_id: int, reason: str, actor=None, actor_label: str = "") -> Wallet:
    """Pause a wallet: its charges are answered 402 (details.reason = wallet_paused)
    until credits arrive (any grant activation resumes it) or ``wallet_resume``.
    Safe to call from a balance-crossing subscriber (same transaction, lock already held). Idempotent."""
    with transaction.atomic():
        wallet = lock_wallet(wallet_id)
        if wallet.status == Wallet.Status.PAUSED:
            return wallet
        wallet.status = Wallet.Status.PAUSED
        wallet.paused_reason = reason[:200]
        wallet.save(update_fields=["status", "paused_reason"])
        audit_record(actor=actor, actor_label=actor_label or "system", action="wallet.pause", obj=wallet,
                     changes={"reason": reason})
        events.publish("wallet.paused", {"wallet": wallet.pk, "customer": wallet.customer_id, "reason": reason,
                                         "at": timezone.now().isoformat()})
    return wallet


def wallet_resume(*, wallet_id: int, actor=None, actor_label: str = "") -> Wallet:
    """Resume a paused wallet by hand. Idempotent."""
    with transaction.atomic():
        wallet = lock_wallet(wallet_id)
        if wallet.status != Wallet.Status.PAUSED:
            return wallet
        wallet.status = Wallet.Status.ACTIVE
        wallet.paused_reason = ""
        wallet.save(update_fields=["status", "paused_reason"])
        audit_record(actor=actor, actor_label=actor_label or "system", action="wallet.resume", obj=wallet)
        events.publish("wallet.resumed", {"wallet": wallet.pk, "customer": wallet.customer_id,
                                          "at": timezone.now().isoformat()})
    return wallet


def wallet_set_alert_marks(*, wallet_id: int, below: Decimal | None, at_or_above: Decimal | None) -> None:
    """Set the marks whose crossing calls ``events.balance_crossed``. The alerts app
    keeps them at the band where its rules' state could change."""
    Wallet.objects.filter(pk=wallet_id).update(alert_below=below, alert_at_or_above=at_or_above)
