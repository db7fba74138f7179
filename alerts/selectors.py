"""Reads for alert evaluation, notices, the admin and the API. Never write.

Definitions used by the rules (documented in ``AlertRule``/``AlertLevel``):

- **Burn rate**: credits consumed by usage (``usage`` and ``overage`` ledger
  entries) in the last 7 days, divided by 7 — credits per day.
- **Days until depletion**: available ÷ burn rate (none when nothing burns).
- **Credits granted in the period**: the sum of ``original_amount`` of the
  wallet's grants that took effect in the rule's last ``period_days`` days (30
  by default) and were credited (active, depleted or expired; never pending,
  rejected or voided ones). Percent levels are a share of it.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal

from django.db.models import Q, Sum

from alerts.models import AlertRule, AlertState, AutoTopUp, AutoTopUpRun, Notification
from billing.models import CreditGrant, LedgerEntry, Wallet
from billing.numbers import ZERO, round_credits
from billing.selectors import wallet_balance

BURN_WINDOW_DAYS = 7
CREDITED_STATUSES = (CreditGrant.Status.ACTIVE, CreditGrant.Status.DEPLETED, CreditGrant.Status.EXPIRED)


def wallet_available(wallet: Wallet, *, at: datetime) -> Decimal:
    return wallet_balance(wallet, at=at).available


def burn_rate(wallet_id: int, *, now: datetime, days: int = BURN_WINDOW_DAYS) -> Decimal:
    """Average credits consumed per day over the last ``days`` days."""
    used = LedgerEntry.objects.filter(
        wallet_id=wallet_id, type__in=(LedgerEntry.Type.USAGE, LedgerEntry.Type.OVERAGE),
        created_at__gt=now - timedelta(days=days), created_at__lte=now,
    ).aggregate(total=Sum("amount"))["total"] or ZERO
    return round_credits(-used / days)


def days_until_depletion(available: Decimal, burn: Decimal) -> Decimal | None:
    if burn <= 0:
        return None
    return round_credits(max(available, ZERO) / burn)


def projected_depletion_date(available: Decimal, burn: Decimal, *, now: datetime) -> date | None:
    """The local calendar date the wallet runs dry at ``burn`` credits a day; None without burn or past year 9999."""
    days = days_until_depletion(available, burn)
    if days is None:
        return None
    whole = int(days)
    try:
        return (now + timedelta(days=whole, seconds=int((days - whole) * 86400))).date()
    except OverflowError:
        return None  # a tiny burn puts depletion beyond the calendar (year 9999): none in sight


def granted_in_period(wallet_id: int, *, now: datetime, days: int) -> Decimal:
    return CreditGrant.objects.filter(
        wallet_id=wallet_id, status__in=CREDITED_STATUSES,
        effective_at__gt=now - timedelta(days=days), effective_at__lte=now,
    ).aggregate(total=Sum("original_amount"))["total"] or ZERO


def customer_rules(customer) -> list[AlertRule]:
    """The customer's own override rule (if any) with its levels."""
    return list(AlertRule.objects.filter(scope=AlertRule.Scope.CUSTOMER, customer=customer)
                .prefetch_related("levels"))


def wallet_alert_states(wallet: Wallet) -> list[AlertState]:
    return list(AlertState.objects.filter(wallet=wallet).select_related("level", "level__rule"))


def auto_top_up_for(wallet: Wallet) -> AutoTopUp | None:
    return AutoTopUp.objects.filter(wallet=wallet).select_related("pack").first()


def auto_top_up_month_totals(wallet_id: int, *, month_start: datetime) -> tuple[int, Decimal]:
    """(count, credits) of this month's top-ups that added or will add credits."""
    counted = (AutoTopUpRun.Status.SUCCEEDED, AutoTopUpRun.Status.PENDING_APPROVAL,
               AutoTopUpRun.Status.AWAITING_PAYMENT)
    row = AutoTopUpRun.objects.filter(wallet_id=wallet_id, status__in=counted, created_at__gte=month_start).aggregate(
        credits=Sum("credits"))
    count = AutoTopUpRun.objects.filter(wallet_id=wallet_id, status__in=counted, created_at__gte=month_start).count()
    return count, row["credits"] or ZERO


def webhook_deliveries(*, customer=None, endpoint_id: int | None = None, status: str | None = None,
                       event_type: str | None = None):
    qs = Notification.objects.filter(channel=Notification.Channel.WEBHOOK).select_related("endpoint", "customer")
    if customer is not None:
        qs = qs.filter(Q(customer=customer) | Q(endpoint__customer=customer))
    if endpoint_id is not None:
        qs = qs.filter(endpoint_id=endpoint_id)
    if status:
        qs = qs.filter(status=status)
    if event_type:
        qs = qs.filter(event_type=event_type)
    return qs.prefetch_related("attempt_log").order_by("-pk")
