"""Read-only blocks shown on the customer and wallet change pages: balances,
usable grants in consumption order, recent ledger entries, open holds and a
30-day usage chart. Every block is a bounded query; nothing here writes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import Sum
from django.db.models.functions import TruncDate
from django.urls import reverse
from django.utils import timezone

from billing.models import LedgerEntry, Reservation, UsageEvent, Wallet
from billing.numbers import ZERO
from billing.selectors import wallet_balance

RECENT_ENTRIES = 50
CHART_DAYS = 30
CHART_HEIGHT = 80
CHART_BAR_WIDTH = 14


def wallet_panel(wallet: Wallet, *, now=None) -> dict:
    """Balance, usable grants, the newest ledger entries (capped) and open holds of one wallet."""
    now = now or timezone.now()
    balance = wallet_balance(wallet, at=now)
    entries = list(
        LedgerEntry.objects.filter(wallet=wallet).select_related("grant").order_by("-sequence")[:RECENT_ENTRIES]
    )
    holds = list(
        Reservation.objects.filter(wallet=wallet, status=Reservation.Status.OPEN, expires_at__gt=now)
        .select_related("feature").order_by("expires_at")
    )
    ledger_url = reverse("admin:billing_ledgerentry_changelist") + f"?wallet__id__exact={wallet.pk}"
    return {
        "wallet": wallet,
        "balance": balance,
        "by_kind": sorted(balance.by_kind.items()),
        "entries": entries,
        "entries_capped": len(entries) == RECENT_ENTRIES,
        "holds": holds,
        "ledger_url": ledger_url,
    }


@dataclass
class ChartBar:
    day: object
    credits: Decimal
    height: int
    x: int
    y: int


def usage_chart(wallet_ids: list[int], *, now=None) -> dict:
    """Charged credits per UTC day over the last CHART_DAYS days, as SVG bar geometry."""
    now = now or timezone.now()
    today = now.astimezone(UTC).date()
    start_day = today - timedelta(days=CHART_DAYS - 1)
    start = datetime.combine(start_day, time.min, tzinfo=UTC)
    # Events are refused unless they occurred at most the clock skew after they
    # were received, so created_at >= start - skew bounds the index range scan.
    skew = timedelta(seconds=settings.CREDITDESK_CLOCK_SKEW_SECONDS)
    rows = (
        UsageEvent.objects.filter(wallet_id__in=wallet_ids, status=UsageEvent.Status.CHARGED,
                                  occurred_at__gte=start, created_at__gte=start - skew)
        .annotate(day=TruncDate("occurred_at", tzinfo=UTC))
        .values("day")
        .annotate(credits=Sum("credits"))
        .order_by("day")
    )
    per_day = {row["day"]: row["credits"] or ZERO for row in rows}
    days = [start_day + timedelta(days=i) for i in range(CHART_DAYS)]
    peak = max(per_day.values(), default=ZERO)
    bars = []
    for index, day in enumerate(days):
        credits = per_day.get(day, ZERO)
        height = int(credits / peak * CHART_HEIGHT) if peak > 0 else 0
        if credits > 0:
            height = max(height, 1)
        bars.append(ChartBar(day=day, credits=credits, height=height, x=index * (CHART_BAR_WIDTH + 2),
                             y=CHART_HEIGHT - height))
    return {
        "bars": bars,
        "peak": peak,
        "total": sum(per_day.values(), ZERO),
        "width": CHART_DAYS * (CHART_BAR_WIDTH + 2),
        "height": CHART_HEIGHT,
        "bar_width": CHART_BAR_WIDTH,
        "first_day": days[0],
        "last_day": days[-1],
    }
