"""Reads that shape billing data for the API and the admin. Never write."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.db.models import Q, Sum
from django.utils import timezone

from billing.models import CreditGrant, Reservation, Wallet
from billing.numbers import ZERO


@dataclass
class WalletBalance:
    wallet: Wallet
    available: Decimal
    ledger_balance: Decimal
    held: Decimal
    overage: Decimal
    by_kind: dict[str, Decimal]
    grants: list[CreditGrant] = field(default_factory=list)
    as_of: datetime | None = None


def wallet_balance(wallet: Wallet, *, at: datetime | None = None) -> WalletBalance:
    """Available = usable remaining − open unexpired holds (+ overdraft headroom).
    ``grants`` are the usable ones in consumption order (feature-scoped ones included)."""
    at = at or timezone.now()
    grants = list(
        CreditGrant.objects.filter(wallet=wallet, status=CreditGrant.Status.ACTIVE, effective_at__lte=at,
                                   remaining__gt=0)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=at))
        .in_consumption_order()
    )
    held = Reservation.objects.filter(wallet=wallet, status=Reservation.Status.OPEN, expires_at__gt=at).aggregate(
        total=Sum("amount"))["total"] or ZERO
    by_kind: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for grant in grants:
        by_kind[grant.kind] += grant.remaining
    unscoped = sum((g.remaining for g in grants if g.feature_id is None), ZERO)
    headroom = max(wallet.credit_limit - wallet.overage, ZERO) if wallet.policy == Wallet.Policy.OVERDRAFT else ZERO
    return WalletBalance(
        wallet=wallet,
        available=unscoped - held + headroom,
        ledger_balance=wallet.ledger_balance,
        held=held,
        overage=wallet.overage,
        by_kind=dict(by_kind),
        grants=grants,
        as_of=at,
    )
