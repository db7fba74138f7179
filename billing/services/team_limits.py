"""Per-team spending limits on a pooled wallet.

An organisation's wallet may be shared by several teams; its usage names the
team in ``properties.team``. Finance may cap what a team spends per calendar
month in the customer's time zone. A charge that would take the team over its
limit is refused (402 ``team_limit_exceeded``, nothing charged) while the other
teams keep charging.

What is limited and counted (documented for API clients in the README):

- an event whose ``properties.team`` is a string equal (exactly, case included)
  to the team of a limit on the wallet charged. An event without a team, with a
  non-string team, or naming a team without a limit is not limited and is not
  counted anywhere;
- ``spent`` is the credits charged (from grants and as overage alike) in the
  month the charge is made (its ``now``, not ``occurred_at``: a late event counts
  in the month the credits leave the wallet, so a past month's figure never
  changes). Refused events and open holds count nothing; a captured hold counts
  when its capture carries the team;
- the month starts at local midnight on the 1st in the customer's time zone; a
  new month starts a new counter (``TeamSpend`` row) at zero.

Concurrency: the counter row of (limit, month) is locked by the charging
transaction after the wallet (lock order grants → wallet → team spends →
reservations, ``billing.services.locks``) and updated before it commits, so two
charges of one team can never together pass its limit. Wallets without limits
(``Wallet.has_team_limits`` false) never look for them.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterable
from datetime import date, datetime, time
from decimal import Decimal

from django.db import transaction
from django.db.models import Q, Sum
from django.utils import timezone

from billing.errors import InvalidRequest, NotFound
from billing.models import TeamSpend, TeamSpendingLimit, UsageEvent, Wallet
from billing.numbers import MAX_CREDITS, ZERO, round_credits
from billing.services.audit import audit_record
from billing.services.locks import lock_wallet

MAX_TEAM_LENGTH = TeamSpendingLimit._meta.get_field("team").max_length


def team_of(properties) -> str | None:
    """The team a usage event is charged to, or None (no team, or not a string)."""
    team = properties.get("team") if isinstance(properties, dict) else None
    return team if isinstance(team, str) else None


def period_start(timezone_name: str, at: datetime) -> date:
    """The first day of ``at``'s calendar month in the customer's time zone."""
    return at.astimezone(zoneinfo.ZoneInfo(timezone_name)).date().replace(day=1)


def period_bounds(timezone_name: str, start: date) -> tuple[datetime, datetime]:
    """[start, end) of the month beginning ``start``, as aware datetimes (DST-correct)."""
    zone = zoneinfo.ZoneInfo(timezone_name)
    end = date(start.year + start.month // 12, start.month % 12 + 1, 1)
    return datetime.combine(start, time(), zone), datetime.combine(end, time(), zone)


def team_spent(*, wallet_id: int, team: str, timezone_name: str, start: date) -> Decimal:
    """Credits charged to ``team`` on the wallet in the month beginning ``start``,
    summed from its usage events (what a new limit starts the month at)."""
    begins, ends = period_bounds(timezone_name, start)
    total = UsageEvent.objects.filter(
        wallet_id=wallet_id, status=UsageEvent.Status.CHARGED, properties__team=team,
        created_at__gte=begins, created_at__lt=ends,
    ).aggregate(total=Sum("credits"))["total"]
    return total or ZERO


def lock_team_spends(*, keys: Iterable[tuple[int, str, str]], now: datetime) -> dict[tuple[int, str], TeamSpend]:
    """For (wallet id, team, customer time zone) keys: the locked counter row of
    each team that has a limit, for ``now``'s month, keyed by (wallet id, team),
    with ``team_limit`` loaded. Creates a month's row at zero when missing. The
    caller holds the wallets' locks (which also serialise the row creation)."""
    wanted = {(wallet_id, team): tz for wallet_id, team, tz in keys}
    if not wanted:
        return {}
    limits = [
        limit for limit in TeamSpendingLimit.objects.filter(
            wallet_id__in={w for w, _ in wanted}, team__in={t for _, t in wanted})
        if (limit.wallet_id, limit.team) in wanted
    ]
    if not limits:
        return {}
    periods = {limit.pk: period_start(wanted[(limit.wallet_id, limit.team)], now) for limit in limits}
    TeamSpend.objects.bulk_create(
        [TeamSpend(team_limit_id=pk, period_start=start, spent=ZERO) for pk, start in periods.items()],
        ignore_conflicts=True,
    )
    match = Q()
    for pk, start in periods.items():
        match |= Q(team_limit_id=pk, period_start=start)
    by_id = {limit.pk: limit for limit in limits}
    spends = {}
    for spend in TeamSpend.objects.select_for_update(of=("self",)).filter(match).order_by("pk"):
        spend.team_limit = by_id[spend.team_limit_id]
        spends[(spend.team_limit.wallet_id, spend.team_limit.team)] = spend
    return spends


def team_limit_left(*, wallet: Wallet, properties, at: datetime) -> Decimal | None:
    """What the event's team may still spend this month on the wallet, or None when
    no limit applies (a read, no lock: for ``POST /usage/check``)."""
    team = team_of(properties)
    if not wallet.has_team_limits or team is None:
        return None
    limit = TeamSpendingLimit.objects.filter(wallet_id=wallet.pk, team=team).first()
    if limit is None:
        return None
    start = period_start(wallet.customer.timezone, at)
    spent = TeamSpend.objects.filter(team_limit=limit, period_start=start).values_list("spent", flat=True).first()
    return limit.monthly_limit - (spent or ZERO)


def team_limit_exceeded_body(*, event_id: str, team: str, limit: Decimal, spent: Decimal, requested: Decimal,
                             start: date) -> dict:
    """The 402 answer for a charge over its team's limit (stored and replayed like any refusal)."""
    return {"error": {
        "code": "team_limit_exceeded",
        "message": f"Team {team!r} has spent {spent} of its {limit} credits for {start:%Y-%m}; "
                   f"this event needs {requested}.",
        "details": {"team": team, "limit": str(limit), "spent": str(spent), "requested": str(requested),
                    "period": f"{start:%Y-%m}", "event_id": event_id},
    }}


def _clean_team(team: str) -> str:
    team = (team or "").strip()
    if not team or len(team) > MAX_TEAM_LENGTH:
        raise InvalidRequest(f"team must be 1 to {MAX_TEAM_LENGTH} characters.",
                             details={"team": f"must be 1 to {MAX_TEAM_LENGTH} characters"})
    return team


def _clean_limit(monthly_limit: Decimal) -> Decimal:
    if not isinstance(monthly_limit, Decimal) or not monthly_limit.is_finite() or monthly_limit < 0 \
            or monthly_limit > MAX_CREDITS:
        raise InvalidRequest("monthly_limit must be a number of credits, 0 or more.",
                             details={"monthly_limit": "must be 0 or more credits"})
    return round_credits(monthly_limit)


def team_limit_set(*, wallet_id: int, team: str, monthly_limit: Decimal, actor=None,
                   now: datetime | None = None) -> TeamSpendingLimit:
    """Create or change ``team``'s monthly limit on a wallet. Locks the wallet (no
    charge of it runs meanwhile) and marks it ``has_team_limits``. A new limit
    starts the current month at what the team was already charged this month, so
    setting it mid-month does not forgive earlier spend. Audited. Raises NotFound
    for an unknown wallet, InvalidRequest for an empty team or a negative limit."""
    now = now or timezone.now()
    team, monthly_limit = _clean_team(team), _clean_limit(monthly_limit)
    with transaction.atomic():
        try:
            wallet = lock_wallet(wallet_id)
        except Wallet.DoesNotExist:
            raise NotFound(f"No wallet {wallet_id}.", details={"wallet": "not found"}) from None
        limit = TeamSpendingLimit.objects.filter(wallet_id=wallet.pk, team=team).first()
        before = None if limit is None else limit.monthly_limit
        if limit is None:
            limit = TeamSpendingLimit.objects.create(wallet=wallet, team=team, monthly_limit=monthly_limit)
            tz = wallet.customer.timezone
            start = period_start(tz, now)
            TeamSpend.objects.create(team_limit=limit, period_start=start,
                                     spent=team_spent(wallet_id=wallet.pk, team=team, timezone_name=tz, start=start))
        elif limit.monthly_limit != monthly_limit:
            limit.monthly_limit = monthly_limit
            limit.save(update_fields=["monthly_limit"])
        else:
            return limit
        if not wallet.has_team_limits:
            wallet.has_team_limits = True
            wallet.save(update_fields=["has_team_limits"])
        audit_record(actor=actor, action="team_limit.set", obj=limit,
                     changes={"wallet": wallet.pk, "team": team, "monthly_limit": [before, monthly_limit]})
    return limit


def team_limit_remove(*, team_limit_id: int, actor=None) -> None:
    """Remove a team's limit (its monthly counters go with it): the team charges
    without a cap from now on. Locks the wallet; clears ``has_team_limits`` with
    the wallet's last limit. Audited. Idempotent (an unknown id is a no-op)."""
    with transaction.atomic():
        wallet_id = TeamSpendingLimit.objects.filter(pk=team_limit_id).values_list("wallet_id", flat=True).first()
        if wallet_id is None:
            return
        wallet = lock_wallet(wallet_id)
        limit = TeamSpendingLimit.objects.filter(pk=team_limit_id).first()
        if limit is None:
            return
        audit_record(actor=actor, action="team_limit.remove", obj=limit,
                     changes={"wallet": wallet.pk, "team": limit.team, "monthly_limit": limit.monthly_limit})
        limit.delete()
        still_limited = TeamSpendingLimit.objects.filter(wallet_id=wallet.pk).exists()
        if wallet.has_team_limits != still_limited:
            wallet.has_team_limits = still_limited
            wallet.save(update_fields=["has_team_limits"])
