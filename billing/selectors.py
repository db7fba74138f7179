"""Reads that shape billing data for the API and the admin. Never write."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.db.models import Q, Sum
from django.utils import timezone

from billing import prepared
from billing.models import CreditGrant, Customer, Feature, Reservation, Wallet
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


@dataclass
class BalanceGrant:
    id: int
    kind: str
    remaining: Decimal
    original_amount: Decimal
    priority: int
    effective_at: datetime
    expires_at: datetime | None
    status: str
    feature_key: str | None


@dataclass
class CustomerBalance:
    """``wallet_balance``'s figures for a customer's default wallet, without model instances."""

    available: Decimal
    ledger_balance: Decimal
    held: Decimal
    overage: Decimal
    by_kind: dict[str, Decimal]
    grants: list[BalanceGrant]
    as_of: datetime


_CUSTOMER_BALANCE_SQL = f"""
    SELECT w.ledger_balance, w.overage, w.credit_limit, w.policy,
           (SELECT coalesce(sum(r.amount), 0) FROM {Reservation._meta.db_table} r
             WHERE r.wallet_id = w.id AND r.status = %(open)s AND r.expires_at > %(at)s),
           g.id, g.kind, g.remaining, g.original_amount, g.priority, g.effective_at, g.expires_at, g.status,
           g.feature_id, f.key
      FROM {Customer._meta.db_table} c
      JOIN {Wallet._meta.db_table} w ON w.customer_id = c.id AND w.is_default
      LEFT JOIN {CreditGrant._meta.db_table} g ON g.wallet_id = w.id AND g.status = %(active)s
           AND g.effective_at <= %(at)s AND g.remaining > 0 AND (g.expires_at IS NULL OR g.expires_at > %(at)s)
      LEFT JOIN {Feature._meta.db_table} f ON f.id = g.feature_id
     WHERE c.external_id = %(customer)s
     ORDER BY g.priority, g.expires_at ASC NULLS LAST, g.per_unit_cost_basis, g.effective_at, g.created_at, g.id
"""


_BALANCE_PARAMS = {"open": Reservation.Status.OPEN.value, "active": CreditGrant.Status.ACTIVE.value}
_KINDS = tuple(CreditGrant.Kind.values)
_OVERDRAFT = Wallet.Policy.OVERDRAFT.value


def customer_balance(external_id: str, *, at: datetime | None = None) -> CustomerBalance | None:
    """The balance of a customer's default wallet in one statement (None: no such
    customer): the same figures and grant order as ``wallet_balance``."""
    at = at or timezone.now()
    rows = prepared.fetch(_CUSTOMER_BALANCE_SQL, {"customer": external_id, "at": at, **_BALANCE_PARAMS},
                          all_rows=True)
    if not rows:
        return None
    ledger_balance, overage, credit_limit, policy, held = rows[0][:5]
    by_kind: dict[str, Decimal] = dict.fromkeys(_KINDS, ZERO)
    grants = []
    unscoped = ZERO
    for row in rows:
        if row[5] is None:
            continue
        grant = BalanceGrant(*row[5:13], feature_key=row[14])
        grants.append(grant)
        by_kind[grant.kind] = by_kind.get(grant.kind, ZERO) + grant.remaining
        if row[13] is None:
            unscoped += grant.remaining
    headroom = max(credit_limit - overage, ZERO) if policy == _OVERDRAFT else ZERO
    return CustomerBalance(available=unscoped - held + headroom, ledger_balance=ledger_balance, held=held,
                           overage=overage, by_kind=by_kind, grants=grants, as_of=at)


@dataclass
class RateImpactRow:
    customer_id: int
    external_id: str
    name: str
    events: int
    current_credits: Decimal
    proposed_credits: Decimal

    @property
    def delta(self) -> Decimal:
        return self.proposed_credits - self.current_credits

    @property
    def delta_percent(self) -> Decimal | None:
        if not self.current_credits:
            return None
        return (self.delta / self.current_credits * 100).quantize(Decimal("0.1"))


def rate_card_impact(*, proposed: dict[int, Decimal], start: datetime, end: datetime) -> list[RateImpactRow]:
    """Replay charged usage in [start, end) under ``proposed`` credit costs
    (feature id → credits per unit) and compare with what was charged, per
    customer, biggest increase first. Each event is re-priced and rounded on
    its own, as the engine would have; features not in ``proposed`` keep
    their charged credits. Reads only; nothing is re-charged."""
    from django.db.models import Case, Count, DecimalField, F, Value, When
    from django.db.models.functions import Round

    from billing.models import UsageEvent

    credit = DecimalField(max_digits=20, decimal_places=6)
    repriced = Case(
        *[
            When(feature_id=feature_id, then=Round(F("quantity") * Value(rate), 6, output_field=credit))
            for feature_id, rate in proposed.items()
        ],
        default=F("credits"),
        output_field=credit,
    )
    rows = (
        UsageEvent.objects.filter(status=UsageEvent.Status.CHARGED, occurred_at__gte=start, occurred_at__lt=end)
        .values("customer_id", "customer__external_id", "customer__name")
        .annotate(events=Count("pk"), current=Sum("credits"), proposed=Sum(repriced))
    )
    result = [
        RateImpactRow(
            customer_id=row["customer_id"], external_id=row["customer__external_id"], name=row["customer__name"],
            events=row["events"], current_credits=row["current"] or ZERO, proposed_credits=row["proposed"] or ZERO,
        )
        for row in rows
    ]
    return sorted(result, key=lambda r: r.delta, reverse=True)
