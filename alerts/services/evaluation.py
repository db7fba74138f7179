"""Evaluating a wallet's alert levels, pause and auto top-up breach.

Two entry points:

- ``on_balance_crossed`` — billing's synchronous hook (billing/events.py). It
  runs inside the transaction that moved the balance, with the wallet row
  locked, and only when available credits crossed one of the wallet's two
  marks. It writes the state changes there and then; notices and top-ups are
  queued to run after commit.
- ``wallet_refresh`` — the sweep and the after-commit reactions to billing
  events: evaluates at the current balance and clock, taking the wallet lock
  only when something would change.

Semantics:

- A balance level is *breached* when available ≤ threshold; it *recovers* when
  available ≥ threshold + margin, margin = max(threshold × hysteresis_percent,
  hysteresis_credits, 0.000001). A days-left level is breached when days until
  depletion ≤ N and recovers above N × (1 + hysteresis_percent) or when nothing burns.
- Transitions only: armed/recovered → triggered (breach_seq + 1) → recovered.
  All levels crossed at once produce one notice, for the most severe level
  (then the lowest threshold); ``wallet.depleted`` instead of ``balance_low``
  when nothing is left.
- Marks: ``alert_below`` is just above the highest armed threshold under the
  balance (also the auto top-up threshold and, for block wallets, zero);
  ``alert_at_or_above`` the lowest recovery point of a triggered level (or the
  auto top-up re-arm point), so billing calls the hook only on a crossing.
- A block wallet whose available credits reach zero through a crossing is
  paused (unless auto top-up is on: the refill is on its way); billing resumes
  it when credits arrive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from alerts import selectors
from alerts.models import (
    SEVERITY_RANK,
    AlertLevel,
    AlertRule,
    AlertState,
    AutoTopUp,
    AutoTopUpRun,
    EventType,
)
from alerts.services.notifications import notify
from billing.models import Wallet
from billing.numbers import CREDIT_QUANT, ZERO, round_credits
from billing.services.locks import lock_wallet
from billing.services.wallets import wallet_pause, wallet_set_alert_marks

logger = logging.getLogger(__name__)

EPSILON = CREDIT_QUANT
BALANCE_KINDS = (AlertLevel.Kind.ABSOLUTE, AlertLevel.Kind.PERCENT)


def shared_rules() -> list[AlertRule]:
    """Active global and segment rules with their levels (the sweep reads them once per run)."""
    return list(AlertRule.objects.filter(active=True, scope__in=(AlertRule.Scope.SEGMENT, AlertRule.Scope.GLOBAL))
                .prefetch_related("levels").order_by("priority", "created_at", "pk"))


def rule_for_wallet(wallet: Wallet, *, shared: list[AlertRule] | None = None) -> AlertRule | None:
    """The one rule that applies: customer override, else matching segment, else global
    (lowest priority, then oldest, within a scope)."""
    if shared is None:
        rules = list(
            AlertRule.objects.filter(active=True)
            .filter(Q(scope=AlertRule.Scope.CUSTOMER, customer_id=wallet.customer_id)
                    | Q(scope__in=(AlertRule.Scope.SEGMENT, AlertRule.Scope.GLOBAL)))
            .prefetch_related("levels").order_by("priority", "created_at", "pk")
        )
    else:
        own = AlertRule.objects.filter(active=True, scope=AlertRule.Scope.CUSTOMER, customer_id=wallet.customer_id)
        rules = list(own.prefetch_related("levels")) + shared
    metadata = wallet.customer.metadata or {}
    for scope in (AlertRule.Scope.CUSTOMER, AlertRule.Scope.SEGMENT, AlertRule.Scope.GLOBAL):
        for rule in rules:
            if rule.scope != scope:
                continue
            if scope == AlertRule.Scope.SEGMENT and str(metadata.get(rule.segment_key, "\0")) != rule.segment_value:
                continue
            return rule
    return None


@dataclass
class Measure:
    level: AlertLevel
    threshold: Decimal | None  # None: the level does not apply now (percent of nothing granted)
    measured: Decimal | None  # available credits, or days left (None: not depleting)
    margin: Decimal

    @property
    def breached(self) -> bool:
        return self.threshold is not None and self.measured is not None and self.measured <= self.threshold

    @property
    def recovered(self) -> bool:
        if self.threshold is None:
            return False
        return self.measured is None or self.measured >= self.threshold + self.margin


class _WalletFacts:
    """Burn rate and granted-in-period, each read at most once and only if a level needs it."""

    def __init__(self, wallet: Wallet, now: datetime):
        self.wallet, self.now = wallet, now
        self._burn: Decimal | None = None
        self._granted: dict[int, Decimal] = {}

    @property
    def burn(self) -> Decimal:
        if self._burn is None:
            self._burn = selectors.burn_rate(self.wallet.pk, now=self.now)
        return self._burn

    def granted(self, days: int) -> Decimal:
        if days not in self._granted:
            self._granted[days] = selectors.granted_in_period(self.wallet.pk, now=self.now, days=days)
        return self._granted[days]


def measure_levels(rule: AlertRule, available: Decimal, facts: _WalletFacts) -> list[Measure]:
    out = []
    pct = rule.hysteresis_percent / Decimal(100)
    for level in rule.levels.all():
        if level.kind == AlertLevel.Kind.DAYS_LEFT:
            days = selectors.days_until_depletion(available, facts.burn)
            out.append(Measure(level, level.value, days, max(level.value * pct, EPSILON)))
            continue
        if level.kind == AlertLevel.Kind.PERCENT:
            granted = facts.granted(rule.period_days)
            threshold = round_credits(granted * level.value / Decimal(100)) if granted > 0 else None
        else:
            threshold = level.value
        margin = max(round_credits((threshold or ZERO) * pct), rule.hysteresis_credits, EPSILON)
        out.append(Measure(level, threshold, available, margin))
    return out


@dataclass
class Plan:
    rule: AlertRule | None
    available: Decimal
    triggered: list[tuple[AlertState, Measure]] = field(default_factory=list)
    recovered: list[tuple[AlertState, Measure]] = field(default_factory=list)
    pause: bool = False
    top_up_breach: bool = False
    top_up_rearm: bool = False
    below: Decimal | None = None
    at_or_above: Decimal | None = None

    def changes(self, wallet: Wallet) -> bool:
        return bool(self.triggered or self.recovered or self.pause or self.top_up_breach or self.top_up_rearm
                    or self.below != wallet.alert_below or self.at_or_above != wallet.alert_at_or_above)


def _pause_enabled(rule: AlertRule | None) -> bool:
    return rule.pause_when_depleted if rule else bool(getattr(settings, "ALERTS_PAUSE_WHEN_DEPLETED", True))


def plan_wallet(*, wallet: Wallet, available: Decimal, now: datetime, cause: str,
                auto: AutoTopUp | None, shared: list[AlertRule] | None = None) -> Plan:
    """Decide what changes at ``available`` (reads only)."""
    rule = rule_for_wallet(wallet, shared=shared)
    plan = Plan(rule=rule, available=available)
    down: list[Decimal] = []
    up: list[Decimal] = []
    if rule is not None:
        states = {s.level_id: s for s in AlertState.objects.filter(wallet=wallet, level__rule=rule)}
        for m in measure_levels(rule, available, _WalletFacts(wallet, now)):
            state = states.get(m.level.pk) or AlertState(wallet=wallet, level=m.level)
            triggered = state.status == AlertState.Status.TRIGGERED
            if not triggered and m.breached:
                plan.triggered.append((state, m))
                triggered = True
            elif triggered and m.recovered:
                plan.recovered.append((state, m))
                triggered = False
            if m.level.kind in BALANCE_KINDS and m.threshold is not None:
                if triggered:
                    up.append(m.threshold + m.margin)
                elif available > m.threshold:
                    down.append(m.threshold + EPSILON)
    auto_on = auto is not None and auto.enabled
    if auto_on:
        if auto.armed and available <= auto.threshold:
            plan.top_up_breach = True
        elif not auto.armed and available > auto.threshold:
            plan.top_up_rearm = True
        armed = (auto.armed and not plan.top_up_breach) or plan.top_up_rearm
        (down if armed else up).append(auto.threshold + EPSILON)
    if wallet.policy == Wallet.Policy.BLOCK and _pause_enabled(rule) and not auto_on:
        if available > 0:
            down.append(EPSILON)
        elif cause not in ("sweep", "grant") and wallet.status == Wallet.Status.ACTIVE:
            plan.pause = True
    plan.below = max(down) if down else None
    plan.at_or_above = min(up) if up else None
    return plan


def _most_severe(items: list[tuple[AlertState, Measure]]) -> tuple[AlertState, Measure]:
    return max(items, key=lambda sm: (SEVERITY_RANK[sm[1].level.severity],
                                      -(sm[1].threshold if sm[1].threshold is not None else ZERO)))


def wallet_payload(wallet: Wallet, *, available: Decimal, now: datetime, measure: Measure | None = None) -> dict:
    """What a notice says: customer, balance, threshold, burn rate, projected depletion, how to top up."""
    customer = wallet.customer
    burn = selectors.burn_rate(wallet.pk, now=now)
    days = selectors.days_until_depletion(available, burn)
    depletion = selectors.projected_depletion_date(available, burn, now=now)
    payload = {
        "customer": customer.external_id, "customer_name": customer.name, "wallet": wallet.pk,
        "wallet_name": wallet.name, "available": str(available), "burn_rate_per_day": str(burn),
        "days_until_depletion": str(days) if days is not None else None,
        "projected_depletion_date": depletion.isoformat() if depletion else None,
        "top_up_url": getattr(settings, "ALERTS_TOP_UP_URL", ""), "as_of": now.isoformat(),
    }
    if measure is not None:
        payload.update({
            "threshold": str(measure.threshold) if measure.threshold is not None else None,
            "level": measure.level.pk, "level_kind": measure.level.kind, "level_value": str(measure.level.value),
            "severity": measure.level.severity,
        })
    return payload


def apply_plan(*, wallet: Wallet, plan: Plan, now: datetime, auto: AutoTopUp | None) -> list[AutoTopUpRun]:
    """Write the plan on a locked wallet; queue notices and top-ups after commit."""
    for state, m in plan.triggered:
        state.status = AlertState.Status.TRIGGERED
        state.breach_seq += 1
        state.triggered_at = now
        state.threshold, state.available_at_change, state.updated_at = m.threshold, plan.available, now
        state.save()
    for state, m in plan.recovered:
        state.status = AlertState.Status.RECOVERED
        state.recovered_at = now
        state.threshold, state.available_at_change, state.updated_at = m.threshold, plan.available, now
        state.save()
    if plan.triggered:
        state, m = _most_severe(plan.triggered)
        event = EventType.DEPLETED if plan.available <= 0 else EventType.BALANCE_LOW
        notify(event_type=event, customer=wallet.customer, wallet=wallet, rule=plan.rule, level=m.level,
               severity=m.level.severity, now=now,
               payload=wallet_payload(wallet, available=plan.available, now=now, measure=m),
               dedupe=f"{event}:{wallet.pk}:{m.level.pk}:{state.breach_seq}")
    elif plan.recovered:
        state, m = _most_severe(plan.recovered)
        notify(event_type=EventType.BALANCE_RECOVERED, customer=wallet.customer, wallet=wallet, rule=plan.rule,
               level=m.level, severity=m.level.severity, now=now,
               payload=wallet_payload(wallet, available=plan.available, now=now, measure=m),
               dedupe=f"{EventType.BALANCE_RECOVERED}:{wallet.pk}:{m.level.pk}:{state.breach_seq}")
    runs = []
    if auto is not None and plan.top_up_breach:
        auto.armed = False
        auto.breach_seq += 1
        auto.save(update_fields=["armed", "breach_seq", "updated_at"])
        run = AutoTopUpRun.objects.create(
            auto_top_up=auto, wallet=wallet, breach_seq=auto.breach_seq, available_at_breach=plan.available,
            idempotency_key=f"auto-top-up:{wallet.pk}:{auto.breach_seq}", created_at=now)
        runs.append(run)
        from alerts.services.auto_top_up import queue_top_up

        queue_top_up(run.pk)
    elif auto is not None and plan.top_up_rearm:
        auto.armed = True
        auto.save(update_fields=["armed", "updated_at"])
    if plan.pause:
        wallet_pause(wallet_id=wallet.pk, reason="Available credits reached zero.", actor_label="alerts")
    if plan.below != wallet.alert_below or plan.at_or_above != wallet.alert_at_or_above:
        wallet_set_alert_marks(wallet_id=wallet.pk, below=plan.below, at_or_above=plan.at_or_above)
        wallet.alert_below, wallet.alert_at_or_above = plan.below, plan.at_or_above
    return runs


def wallet_evaluate(*, wallet: Wallet, available: Decimal, now: datetime, cause: str) -> Plan:
    """Evaluate and apply on a wallet whose row lock the caller holds."""
    auto = AutoTopUp.objects.filter(wallet=wallet).select_related("pack").first()
    plan = plan_wallet(wallet=wallet, available=available, now=now, cause=cause, auto=auto)
    apply_plan(wallet=wallet, plan=plan, now=now, auto=auto)
    return plan


def on_balance_crossed(*, wallet: Wallet, before: Decimal, after: Decimal, cause: str) -> None:
    """billing's crossing hook. A failure here must not undo the charge: it is
    logged, its savepoint rolled back, and the sweep evaluates the wallet again."""
    try:
        with transaction.atomic():
            wallet_evaluate(wallet=wallet, available=after, now=timezone.now(), cause=cause)
    except Exception:
        logger.exception("alert evaluation failed for wallet %s (%s → %s, %s)", wallet.pk, before, after, cause)


def wallet_refresh(*, wallet_id: int, now: datetime | None = None, cause: str = "sweep",
                   shared: list[AlertRule] | None = None) -> Plan | None:
    """Evaluate a wallet at its current balance (sweep, after grants and top-ups).
    Reads without a lock first; locks the wallet only when something changes.
    Idempotent: a second run at the same balance changes nothing."""
    now = now or timezone.now()
    wallet = Wallet.objects.select_related("customer").filter(pk=wallet_id).first()
    if wallet is None:
        return None
    auto = AutoTopUp.objects.filter(wallet=wallet).select_related("pack").first()
    plan = plan_wallet(wallet=wallet, available=selectors.wallet_available(wallet, at=now), now=now, cause=cause,
                       auto=auto, shared=shared)
    if not plan.changes(wallet):
        return plan
    with transaction.atomic():
        wallet = lock_wallet(wallet_id)
        return wallet_evaluate(wallet=wallet, available=selectors.wallet_available(wallet, at=now), now=now,
                               cause=cause)
