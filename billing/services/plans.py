"""Hybrid plans (DESIGN.md §6): a subscription grants the plan's included
credits each period, expiring at the period's end; closing a period expires
what is left, bills the period's fee and its overage on one invoice, and opens
the next period's grant.

Unused included credits may roll over (``rollover`` entries out of the period's
grant and into a ``rollover`` grant), capped at the plan's percentage of the
included amount and usable for the plan's number of rollover periods; a plan's
trial credits are a promotional grant at sign-up, usable in the first period.

Periods are counted in the customer's time zone from the subscription's anchor
date: local midnight to local midnight, a month (or a year) apart, and a
subscription anchored on the 31st ends its February period on the 28th or 29th
and its March period on the 31st again. The fee is billed in arrears.

Every function runs in one transaction; lock order: the subscription row, then
the invoice (``billing.services.invoices``), then grants and the wallet.
"""

from __future__ import annotations

import calendar
import zoneinfo
from datetime import date, datetime, time, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from billing import events
from billing.errors import Conflict, InvalidRequest
from billing.models import (
    CreditGrant,
    Customer,
    InvoiceLine,
    LedgerEntry,
    Plan,
    Subscription,
    SubscriptionPeriod,
    Wallet,
)
from billing.numbers import ZERO, round_credits, round_money
from billing.services.audit import audit_record
from billing.services.grants import default_wallet, grant_create, grant_expire
from billing.services.invoices import invoice_add_line, invoice_create_draft, invoice_issue
from billing.services.ledger import Movement, append_entries
from billing.services.locks import lock_grants, lock_wallet

LIVE_STATUSES = (Subscription.Status.TRIALING, Subscription.Status.ACTIVE, Subscription.Status.PAST_DUE)


def add_months(anchor: date, months: int) -> date:
    """``anchor`` moved ``months`` on, its day clamped to the target month's last day."""
    years, month_index = divmod(anchor.month - 1 + months, 12)
    year, month = anchor.year + years, month_index + 1
    return date(year, month, min(anchor.day, calendar.monthrange(year, month)[1]))


def period_bounds(*, anchor: date, index: int, months: int, tz_name: str) -> tuple[datetime, datetime]:
    """Start and end (aware, exclusive end) of period ``index``: local midnights in ``tz_name``."""
    tz = zoneinfo.ZoneInfo(tz_name)
    start = datetime.combine(add_months(anchor, index * months), time.min, tzinfo=tz)
    end = datetime.combine(add_months(anchor, (index + 1) * months), time.min, tzinfo=tz)
    return start, end


def _open_period(subscription: Subscription, *, index: int, effective_at: datetime, actor=None,
                 actor_label: str = "") -> SubscriptionPeriod:
    plan = subscription.plan
    starts, ends = period_bounds(anchor=subscription.anchor_date, index=index, months=plan.months,
                                 tz_name=subscription.customer.timezone)
    period = SubscriptionPeriod.objects.create(subscription=subscription, index=index, starts_at=starts, ends_at=ends)
    if plan.included_credits > 0:
        period.included_grant = grant_create(
            wallet=subscription.wallet, kind=CreditGrant.Kind.INCLUDED, amount=plan.included_credits,
            source=CreditGrant.Source.PLAN_PERIOD, effective_at=max(effective_at, starts), expires_at=ends,
            currency=plan.currency, reason=f"{plan.name}: included credits {_local_span(period)}",
            requested_by=actor, actor_label=actor_label, require_approval=False,
            idempotency_key=f"subscription:{subscription.pk}:period:{index}",
        )
        period.save(update_fields=["included_grant"])
    subscription.period_index = index
    subscription.current_period_start, subscription.current_period_end = starts, ends
    return period


def _local_span(period: SubscriptionPeriod) -> str:
    tz = zoneinfo.ZoneInfo(period.subscription.customer.timezone)
    last_day = (period.ends_at.astimezone(tz) - timedelta(days=1)).date()
    return f"{period.starts_at.astimezone(tz).date():%Y-%m-%d} – {last_day:%Y-%m-%d}"


def subscription_start(
    *, customer: Customer, plan: Plan, wallet: Wallet | None = None, start_at: datetime | None = None,
    actor=None, actor_label: str = "",
) -> Subscription:
    """Put a customer's wallet on a plan from ``start_at`` (default now): the
    wallet takes the plan's overage policy (overdraft up to the plan's cap, or
    block) and the first period's included credits are granted at once,
    expiring at the period's end. Raises Conflict if the wallet already has a
    live subscription, InvalidRequest for an inactive plan."""
    if not plan.active:
        raise InvalidRequest(f"Plan {plan.code!r} is no longer offered.", details={"plan": plan.code})
    start_at = start_at or timezone.now()
    wallet = wallet or default_wallet(customer)
    if wallet.customer_id != customer.pk:
        raise InvalidRequest("The wallet belongs to another customer.", details={"wallet": wallet.pk})
    anchor = start_at.astimezone(zoneinfo.ZoneInfo(customer.timezone)).date()
    try:
        with transaction.atomic():
            locked = lock_wallet(wallet.pk)
            overdraft = plan.overage_policy == Plan.OveragePolicy.OVERDRAFT
            locked.policy = Wallet.Policy.OVERDRAFT if overdraft else Wallet.Policy.BLOCK
            locked.credit_limit = plan.overage_cap if overdraft else ZERO
            locked.save(update_fields=["policy", "credit_limit"])
            subscription = Subscription(
                customer=customer, plan=plan, wallet=locked, anchor_date=anchor,
                created_by=actor if getattr(actor, "is_authenticated", False) else None,
            )
            subscription.current_period_start, subscription.current_period_end = period_bounds(
                anchor=anchor, index=0, months=plan.months, tz_name=customer.timezone)
            subscription.save()
            _open_period(subscription, index=0, effective_at=start_at, actor=actor, actor_label=actor_label)
            if plan.trial_credits > 0:
                grant_create(
                    wallet=locked, kind=CreditGrant.Kind.PROMOTIONAL, amount=plan.trial_credits,
                    source=CreditGrant.Source.PROMOTION, effective_at=start_at,
                    expires_at=subscription.current_period_end, reason=f"{plan.name}: trial credits",
                    requested_by=actor, actor_label=actor_label, require_approval=False,
                    idempotency_key=f"subscription:{subscription.pk}:trial",
                )
            audit_record(actor=actor, actor_label=actor_label, action="subscription.start", obj=subscription,
                         changes={"plan": plan.code, "start_at": start_at.isoformat(),
                                  "policy": locked.policy, "credit_limit": locked.credit_limit})
            events.publish("subscription.started", {"subscription": subscription.pk, "customer": customer.pk,
                                                    "plan": plan.code})
    except IntegrityError:
        raise Conflict(f"Wallet {wallet} already has a live subscription.", details={"wallet": wallet.pk}) from None
    return subscription


def subscription_period_close(
    *, subscription_id: int, now: datetime | None = None, actor=None, actor_label: str = "",
) -> SubscriptionPeriod | None:
    """Close the subscription's current period once its end has passed, in one
    transaction: roll over the plan's share of its unused included credits and
    expire the rest, bill the period's
    fee and the wallet's outstanding overage (× the plan's overage price) on one
    issued invoice — the overage is settled by a paid-for grant that repays it —
    and open the next period's grant (or end a subscription set to cancel).

    Idempotent per subscription and period: a period not yet over, or a
    subscription already moved on, returns None; a killed run rolls back whole
    and the rerun does the work once. Returns the closed period."""
    now = now or timezone.now()
    with transaction.atomic():
        subscription = (Subscription.objects.select_for_update(of=("self",)).select_related("plan", "customer")
                        .get(pk=subscription_id))
        if subscription.status not in LIVE_STATUSES or subscription.current_period_end > now:
            return None
        plan = subscription.plan
        period = subscription.periods.get(index=subscription.period_index)
        if period.included_grant_id:
            _roll_over(subscription, period)
            grant_expire(grant_id=period.included_grant_id, now=max(now, period.ends_at))
        overage = lock_wallet(subscription.wallet_id).overage
        lines = []
        if plan.base_fee > 0:
            lines.append((InvoiceLine.Kind.PLAN_FEE, f"{plan.name}, {_local_span(period)}", 1, plan.base_fee))
        billed_overage = overage if overage > 0 and plan.overage_price > 0 else ZERO
        if billed_overage:
            lines.append((InvoiceLine.Kind.OVERAGE, f"Overage credits, {_local_span(period)}", billed_overage,
                          plan.overage_price))
        invoice = None
        if lines:
            invoice = invoice_create_draft(customer=subscription.customer, currency=plan.currency, actor=actor,
                                           actor_label=actor_label)
            for kind, description, quantity, unit_price in lines:
                invoice_add_line(invoice_id=invoice.pk, kind=kind, description=description, quantity=quantity,
                                 unit_price=unit_price, actor=actor, actor_label=actor_label)
        if billed_overage:
            grant_create(
                wallet=subscription.wallet, kind=CreditGrant.Kind.PREPAID, amount=billed_overage,
                source=CreditGrant.Source.PLAN_PERIOD, effective_at=now, currency=plan.currency,
                price_paid=round_money(billed_overage * plan.overage_price, plan.currency),
                reason=f"Overage of {_local_span(period)} billed on invoice #{invoice.pk}",
                require_approval=False, actor_label=actor_label or "period close",
                idempotency_key=f"subscription:{subscription.pk}:period:{period.index}:overage",
            )
        if invoice is not None:
            invoice = invoice_issue(invoice_id=invoice.pk, now=now, actor=actor, actor_label=actor_label)
        period.overage_credits, period.invoice, period.closed_at = billed_overage, invoice, now
        period.save(update_fields=["overage_credits", "invoice", "closed_at"])
        if subscription.cancel_at_period_end:
            subscription.status, subscription.canceled_at = Subscription.Status.CANCELED, now
        else:
            _open_period(subscription, index=period.index + 1, effective_at=period.ends_at, actor=actor,
                         actor_label=actor_label)
        subscription.save(update_fields=["status", "canceled_at", "period_index", "current_period_start",
                                         "current_period_end"])
        audit_record(actor=actor, actor_label=actor_label, action="subscription.period_close", obj=subscription,
                     changes={"period": period.index, "invoice": invoice.number if invoice else None,
                              "overage_credits": billed_overage})
        events.publish("subscription.period_closed", {
            "subscription": subscription.pk, "period": period.index,
            "invoice": invoice.pk if invoice else None, "overage_credits": str(billed_overage)})
    return period


def _roll_over(subscription: Subscription, period: SubscriptionPeriod) -> CreditGrant | None:
    """Carry the period's unused included credits (up to the plan's cap) into a
    ``rollover`` grant usable from the next period for ``rollover_periods``
    periods: a ``rollover_out`` entry on the included grant and a
    ``rollover_in`` entry on the new grant, so the balance does not move."""
    plan = subscription.plan
    if plan.rollover_percent <= 0:
        return None
    grant = lock_grants([period.included_grant_id])[period.included_grant_id]
    if grant.status != CreditGrant.Status.ACTIVE or grant.remaining <= 0:
        return None
    amount = min(grant.remaining, round_credits(plan.included_credits * plan.rollover_percent / 100))
    if amount <= 0:
        return None
    wallet = lock_wallet(grant.wallet_id)
    _, expires_at = period_bounds(anchor=subscription.anchor_date, index=period.index + plan.rollover_periods,
                                  months=plan.months, tz_name=subscription.customer.timezone)
    reference = f"subscription:{subscription.pk}:period:{period.index}"
    rolled = CreditGrant.objects.create(
        wallet=wallet, kind=CreditGrant.Kind.ROLLOVER, source=CreditGrant.Source.PLAN_PERIOD,
        original_amount=amount, remaining=amount, per_unit_cost_basis=grant.per_unit_cost_basis,
        currency=grant.currency, effective_at=period.ends_at, expires_at=expires_at, priority=grant.priority,
        reason=f"{plan.name}: unused credits of {_local_span(period)}", idempotency_key=f"{reference}:rollover",
    )
    grant.remaining -= amount
    CreditGrant.objects.filter(pk=grant.pk).update(remaining=grant.remaining)
    memo = f"Rollover of unused included credits, {_local_span(period)}"
    append_entries(wallet=wallet, movements=[
        Movement(type=LedgerEntry.Type.ROLLOVER_OUT, amount=-amount, grant=grant, reference=reference, memo=memo),
        Movement(type=LedgerEntry.Type.ROLLOVER_IN, amount=amount, grant=rolled, reference=reference, memo=memo),
    ])
    return rolled


def subscriptions_close_due(*, now: datetime | None = None, progress=None) -> int:
    """Close every period that has ended, oldest first, one transaction per
    subscription and period (a subscription behind by several periods catches
    up). Safe to kill and rerun. Returns how many periods were closed."""
    now = now or timezone.now()
    closed = 0
    last_pk = 0
    due = Subscription.objects.filter(status__in=LIVE_STATUSES, current_period_end__lte=now)
    while ids := list(due.filter(pk__gt=last_pk).order_by("pk").values_list("pk", flat=True)[:500]):
        for subscription_id in ids:
            while subscription_period_close(subscription_id=subscription_id, now=now) is not None:
                closed += 1
                if progress:
                    progress(1)
        last_pk = ids[-1]
    return closed


def subscription_cancel(*, subscription_id: int, at_period_end: bool = True, actor=None) -> Subscription:
    """Cancel at the current period's end (its close bills it and opens nothing
    more). Immediate cancellation needs proration, not built yet: InvalidRequest."""
    if not at_period_end:
        raise InvalidRequest("Only cancellation at period end is supported.", details={"at_period_end": "true"})
    with transaction.atomic():
        subscription = Subscription.objects.select_for_update(of=("self",)).get(pk=subscription_id)
        if subscription.status not in LIVE_STATUSES:
            raise Conflict(f"Subscription #{subscription.pk} is {subscription.status}.")
        if not subscription.cancel_at_period_end:
            subscription.cancel_at_period_end = True
            subscription.save(update_fields=["cancel_at_period_end"])
            audit_record(actor=actor, action="subscription.cancel", obj=subscription,
                         changes={"at": subscription.current_period_end.isoformat()})
    return subscription

