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

Trials: a plan with ``trial_days`` starts its subscriptions ``trialing``; no
fee is billed for the trial's share of a period, and the status turns
``active`` once the trial is over (``subscriptions_refresh_status``, also run
by each period close). A subscription whose period invoice is overdue is
``past_due`` until it is paid (``payment_record`` calls
``subscription_refresh_status``).

Plan changes mid-period (``subscription_change_plan``) are prorated by the
share of the period left, measured in seconds (so a DST night counts its real
length), and billed on the period's closing invoice — the fee is billed in
arrears, so nothing has been paid for the running period yet. That invoice
carries the fee of the plan the period started on, then per change a credit
note line for the old plan's unused fee and a plan-fee line for the new plan's
remaining fee: old × (1 − f) + new × f in total. The period's included credits
move by (new − old included) × f at once: a grow is an extra ``included``
grant expiring with the period, a shrink an ``adjustment`` entry taking back
unused credits only (credits already consumed stay consumed). Overage run up
under the old plan is billed at the old plan's price on the same invoice and
settled at the change. Only changes between plans of the same currency and
period length are allowed. Cancelling now (``subscription_cancel`` with
``at_period_end=False``) closes the period at once: the unused fee is credited,
the remaining included credits are voided, nothing rolls over.

Every function runs in one transaction; lock order: the subscription row, then
the invoice (``billing.services.invoices``), then grants and the wallet.
"""

from __future__ import annotations

import calendar
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.utils import timezone

from billing import events
from billing.errors import Conflict, InvalidRequest, NotFound
from billing.models import (
    CreditGrant,
    Customer,
    Invoice,
    InvoiceLine,
    LedgerEntry,
    Plan,
    Subscription,
    SubscriptionChange,
    SubscriptionPeriod,
    Wallet,
)
from billing.numbers import ZERO, round_credits, round_money
from billing.services.audit import audit_record
from billing.services.grants import default_wallet, grant_create, grant_expire, grant_void
from billing.services.invoices import invoice_add_line, invoice_create_draft, invoice_issue
from billing.services.ledger import Movement, allocate, append_entries, debit_grants, watch_balance
from billing.services.locks import lock_grants, lock_wallet

LIVE_STATUSES = (Subscription.Status.TRIALING, Subscription.Status.ACTIVE, Subscription.Status.PAST_DUE)
FRACTION_QUANT = Decimal("1e-10")


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


def billable_fraction(*, period_start: datetime, period_end: datetime, start: datetime, end: datetime,
                      trial_ends_at: datetime | None = None) -> Decimal:
    """The share of the period [period_start, period_end) that [start, end) covers
    outside the trial, by elapsed seconds, to 10 decimal places (0..1)."""
    # In UTC: Python subtracts two datetimes of the same time zone by wall clock, missing the DST hour.
    period_start, period_end = period_start.astimezone(UTC), period_end.astimezone(UTC)
    start = max(start.astimezone(UTC), period_start, (trial_ends_at or start).astimezone(UTC))
    end = min(end.astimezone(UTC), period_end)
    if end <= start:
        return ZERO
    seconds = Decimal((end - start).total_seconds())
    length = Decimal((period_end - period_start).total_seconds())
    return min(seconds / length, Decimal(1)).quantize(FRACTION_QUANT)


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


def _local_moment(subscription: Subscription, moment: datetime) -> str:
    return f"{moment.astimezone(zoneinfo.ZoneInfo(subscription.customer.timezone)):%Y-%m-%d %H:%M}"


def _apply_overage_policy(wallet: Wallet, plan: Plan) -> None:
    """The (locked) wallet takes the plan's policy: overdraft up to its cap, or block."""
    overdraft = plan.overage_policy == Plan.OveragePolicy.OVERDRAFT
    wallet.policy = Wallet.Policy.OVERDRAFT if overdraft else Wallet.Policy.BLOCK
    wallet.credit_limit = plan.overage_cap if overdraft else ZERO
    wallet.save(update_fields=["policy", "credit_limit"])


def subscription_start(
    *, customer: Customer, plan: Plan, wallet: Wallet | None = None, start_at: datetime | None = None,
    actor=None, actor_label: str = "",
) -> Subscription:
    """Put a customer's wallet on a plan from ``start_at`` (default now): the
    wallet takes the plan's overage policy (overdraft up to the plan's cap, or
    block) and the first period's included credits are granted at once,
    expiring at the period's end. A plan with trial days starts ``trialing``.
    Raises Conflict if the wallet already has a live subscription,
    InvalidRequest for an inactive plan or another customer's wallet."""
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
            _apply_overage_policy(locked, plan)
            subscription = Subscription(
                customer=customer, plan=plan, wallet=locked, anchor_date=anchor,
                created_by=actor if getattr(actor, "is_authenticated", False) else None,
            )
            if plan.trial_days:
                subscription.trial_ends_at = start_at + timedelta(days=plan.trial_days)
                if subscription.trial_ends_at > timezone.now():
                    subscription.status = Subscription.Status.TRIALING
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
                         changes={"plan": plan.code, "start_at": start_at.isoformat(), "status": subscription.status,
                                  "policy": locked.policy, "credit_limit": locked.credit_limit})
            events.publish("subscription.started", {"subscription": subscription.pk, "customer": customer.pk,
                                                    "plan": plan.code})
    except IntegrityError:
        raise Conflict(f"Wallet {wallet} already has a live subscription.", details={"wallet": wallet.pk}) from None
    return subscription


def _lock_subscription(subscription_id: int) -> Subscription:
    try:
        return (Subscription.objects.select_for_update(of=("self",)).select_related("plan", "customer")
                .get(pk=subscription_id))
    except Subscription.DoesNotExist:
        raise NotFound(f"No subscription #{subscription_id}.", details={"subscription": "not found"}) from None


def _period_grant_ids(period: SubscriptionPeriod) -> list[int]:
    """The period's included grants: the one it opened with, then those plan changes added."""
    ids = [period.included_grant_id] if period.included_grant_id else []
    ids += list(period.changes.filter(included_grant__isnull=False).order_by("pk")
                .values_list("included_grant_id", flat=True))
    return ids


def _fee_lines(subscription: Subscription, period: SubscriptionPeriod, *, ended_at: datetime) -> list[tuple]:
    """The period's fee and proration lines: (kind, description, quantity, unit price), amounts non-zero."""
    changes = list(period.changes.select_related("from_plan", "to_plan").order_by("effective_at", "pk"))
    first_plan = changes[0].from_plan if changes else subscription.plan
    trial_ends_at = subscription.trial_ends_at
    span = _local_span(period)
    lines = []
    share = billable_fraction(period_start=period.starts_at, period_end=period.ends_at, start=period.starts_at,
                              end=period.ends_at, trial_ends_at=trial_ends_at)
    fee = round_money(first_plan.base_fee * share, first_plan.currency)
    if fee > 0:
        note = "" if share == 1 else f" (trial until {_local_moment(subscription, trial_ends_at)} not billed)"
        lines.append((InvoiceLine.Kind.PLAN_FEE, f"{first_plan.name}, {span}{note}", Decimal(1), fee))
    for change in changes:
        when = _local_moment(subscription, change.effective_at)
        if change.unused_credit > 0:
            lines.append((InvoiceLine.Kind.CREDIT_NOTE, f"Unused time on {change.from_plan.name} from {when}",
                          Decimal(1), -change.unused_credit))
        if change.remaining_charge > 0:
            lines.append((InvoiceLine.Kind.PLAN_FEE, f"Remaining time on {change.to_plan.name} from {when}",
                          Decimal(1), change.remaining_charge))
        if change.overage_credits > 0:
            lines.append((InvoiceLine.Kind.OVERAGE, f"Overage credits under {change.from_plan.name} until {when}",
                          change.overage_credits, change.overage_price))
    if ended_at < period.ends_at:
        plan = subscription.plan
        unused = round_money(plan.base_fee * billable_fraction(
            period_start=period.starts_at, period_end=period.ends_at, start=ended_at, end=period.ends_at,
            trial_ends_at=trial_ends_at), plan.currency)
        if unused > 0:
            lines.append((InvoiceLine.Kind.CREDIT_NOTE,
                          f"Unused time on {plan.name} after cancellation at {_local_moment(subscription, ended_at)}",
                          Decimal(1), -unused))
    return lines


def _close(subscription: Subscription, period: SubscriptionPeriod, *, now: datetime, ended_at: datetime,
           actor=None, actor_label: str = "") -> Invoice | None:
    """Close ``period`` of the locked subscription at ``ended_at`` (its end, or
    earlier when cancelled now): included credits roll over and expire (or are
    voided when ended early), fee, proration and overage are invoiced and the
    overage settled by a paid-for grant. Returns the issued invoice, if any."""
    plan = subscription.plan
    grant_ids = _period_grant_ids(period)
    if ended_at >= period.ends_at:
        _roll_over(subscription, period, grant_ids)
        for grant_id in grant_ids:
            grant_expire(grant_id=grant_id, now=max(now, period.ends_at))
    else:
        live = CreditGrant.objects.filter(pk__in=grant_ids, status=CreditGrant.Status.ACTIVE, remaining__gt=0)
        for grant_id in sorted(live.values_list("pk", flat=True)):
            grant_void(grant_id=grant_id, actor=actor, actor_label=actor_label,
                       reason=f"{plan.name} cancelled at {_local_moment(subscription, ended_at)}")
    overage = lock_wallet(subscription.wallet_id).overage
    lines = _fee_lines(subscription, period, ended_at=ended_at)
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
        _settle_overage(subscription, billed_overage, plan.overage_price, now=now,
                        reason=f"Overage of {_local_span(period)} billed on invoice #{invoice.pk}",
                        idempotency_key=f"subscription:{subscription.pk}:period:{period.index}:overage")
    if invoice is not None:
        invoice = invoice_issue(invoice_id=invoice.pk, now=now, actor=actor, actor_label=actor_label)
    period.overage_credits = billed_overage + sum((c.overage_credits for c in period.changes.all()), ZERO)
    period.invoice, period.closed_at = invoice, now
    period.save(update_fields=["overage_credits", "invoice", "closed_at"])
    return invoice


def _settle_overage(subscription: Subscription, credits: Decimal, price: Decimal, *, now: datetime, reason: str,
                    idempotency_key: str) -> CreditGrant:
    """A grant paid for on the period's invoice that repays ``credits`` of overage."""
    plan = subscription.plan
    return grant_create(
        wallet=subscription.wallet, kind=CreditGrant.Kind.PREPAID, amount=credits,
        source=CreditGrant.Source.PLAN_PERIOD, effective_at=now, currency=plan.currency,
        price_paid=round_money(credits * price, plan.currency), reason=reason, require_approval=False,
        actor_label="period close", idempotency_key=idempotency_key,
    )


def subscription_period_close(
    *, subscription_id: int, now: datetime | None = None, actor=None, actor_label: str = "",
) -> SubscriptionPeriod | None:
    """Close the subscription's current period once its end has passed, in one
    transaction: roll over the plan's share of its unused included credits and
    expire the rest, bill the period's fee (with the proration of plan changes)
    and the wallet's outstanding overage (× the plan's overage price) on one
    issued invoice — the overage is settled by a paid-for grant that repays it —
    and open the next period's grant (or end a subscription set to cancel).

    Idempotent per subscription and period: a period not yet over, or a
    subscription already moved on, returns None; a killed run rolls back whole
    and the rerun does the work once. Returns the closed period."""
    now = now or timezone.now()
    with transaction.atomic():
        subscription = _lock_subscription(subscription_id)
        if subscription.status not in LIVE_STATUSES or subscription.current_period_end > now:
            return None
        period = subscription.periods.get(index=subscription.period_index)
        invoice = _close(subscription, period, now=now, ended_at=period.ends_at, actor=actor,
                         actor_label=actor_label)
        if subscription.cancel_at_period_end:
            subscription.status, subscription.canceled_at = Subscription.Status.CANCELED, now
            _end_overdraft(subscription)
        else:
            _open_period(subscription, index=period.index + 1, effective_at=period.ends_at, actor=actor,
                         actor_label=actor_label)
            subscription.status = _status_for(subscription, now=now)
        subscription.save(update_fields=["status", "canceled_at", "period_index", "current_period_start",
                                         "current_period_end"])
        audit_record(actor=actor, actor_label=actor_label, action="subscription.period_close", obj=subscription,
                     changes={"period": period.index, "invoice": invoice.number if invoice else None,
                              "overage_credits": period.overage_credits})
        events.publish("subscription.period_closed", {
            "subscription": subscription.pk, "period": period.index,
            "invoice": invoice.pk if invoice else None, "overage_credits": str(period.overage_credits)})
    return period


def _end_overdraft(subscription: Subscription) -> None:
    """A canceled subscription's wallet goes back to ``block`` with no credit
    limit: the plan's overdraft ends with it, since no later period would bill
    overage run up after the last invoice."""
    wallet = lock_wallet(subscription.wallet_id)
    if wallet.policy == Wallet.Policy.BLOCK and wallet.credit_limit == ZERO:
        return
    before = {"policy": wallet.policy, "credit_limit": wallet.credit_limit}
    wallet.policy, wallet.credit_limit = Wallet.Policy.BLOCK, ZERO
    wallet.save(update_fields=["policy", "credit_limit"])
    audit_record(action="wallet.policy", actor_label="subscription canceled", obj=wallet,
                 changes={"before": before, "after": {"policy": wallet.policy, "credit_limit": ZERO}})


def _roll_over(subscription: Subscription, period: SubscriptionPeriod, grant_ids: list[int]) -> CreditGrant | None:
    """Carry the period's unused included credits (up to the plan's cap) into a
    ``rollover`` grant usable from the next period for ``rollover_periods``
    periods: ``rollover_out`` entries on the included grants and a
    ``rollover_in`` entry on the new grant, so the balance does not move."""
    plan = subscription.plan
    if plan.rollover_percent <= 0 or not grant_ids:
        return None
    locked = lock_grants(grant_ids)
    grants = [locked[pk] for pk in grant_ids if locked[pk].status == CreditGrant.Status.ACTIVE
              and locked[pk].remaining > 0]
    cap = round_credits(plan.included_credits * plan.rollover_percent / 100)
    taken, amount = allocate(grants=grants, amount=cap)
    amount = cap - amount
    if amount <= 0:
        return None
    wallet = lock_wallet(subscription.wallet_id)
    _, expires_at = period_bounds(anchor=subscription.anchor_date, index=period.index + plan.rollover_periods,
                                  months=plan.months, tz_name=subscription.customer.timezone)
    reference = f"subscription:{subscription.pk}:period:{period.index}"
    rolled = CreditGrant.objects.create(
        wallet=wallet, kind=CreditGrant.Kind.ROLLOVER, source=CreditGrant.Source.PLAN_PERIOD,
        original_amount=amount, remaining=amount, per_unit_cost_basis=grants[0].per_unit_cost_basis,
        currency=grants[0].currency, effective_at=period.ends_at, expires_at=expires_at, priority=grants[0].priority,
        reason=f"{plan.name}: unused credits of {_local_span(period)}", idempotency_key=f"{reference}:rollover",
    )
    memo = f"Rollover of unused included credits, {_local_span(period)}"
    movements = []
    for grant, take in taken:
        grant.remaining -= take
        CreditGrant.objects.filter(pk=grant.pk).update(remaining=grant.remaining)
        movements.append(Movement(type=LedgerEntry.Type.ROLLOVER_OUT, amount=-take, grant=grant, reference=reference,
                                  memo=memo))
    movements.append(Movement(type=LedgerEntry.Type.ROLLOVER_IN, amount=amount, grant=rolled, reference=reference,
                              memo=memo))
    append_entries(wallet=wallet, movements=movements)
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


def subscription_cancel(
    *, subscription_id: int, at_period_end: bool = True, now: datetime | None = None, actor=None,
    actor_label: str = "",
) -> Subscription:
    """Cancel a live subscription. At period end (the default): the period's
    close bills it and opens nothing more; idempotent. Now: the current period
    is closed at once — its fee billed up to now (the rest credited), overage
    billed, the remaining included credits voided — and the subscription is
    ``canceled``. Raises Conflict for a canceled subscription or, when cancelling
    now, for a period that has already ended (close it first)."""
    now = now or timezone.now()
    with transaction.atomic():
        subscription = _lock_subscription(subscription_id)
        if subscription.status not in LIVE_STATUSES:
            raise Conflict(f"Subscription #{subscription.pk} is {subscription.status}.",
                           details={"status": subscription.status})
        if at_period_end:
            if not subscription.cancel_at_period_end:
                subscription.cancel_at_period_end = True
                subscription.save(update_fields=["cancel_at_period_end"])
                audit_record(actor=actor, actor_label=actor_label, action="subscription.cancel", obj=subscription,
                             changes={"at": subscription.current_period_end.isoformat()})
            return subscription
        if subscription.current_period_end <= now:
            raise Conflict("The current period has ended; close it before cancelling.",
                           details={"current_period_end": subscription.current_period_end.isoformat()})
        period = subscription.periods.get(index=subscription.period_index)
        invoice = _close(subscription, period, now=now, ended_at=now, actor=actor, actor_label=actor_label)
        subscription.status, subscription.canceled_at = Subscription.Status.CANCELED, now
        subscription.cancel_at_period_end = False
        _end_overdraft(subscription)
        subscription.save(update_fields=["status", "canceled_at", "cancel_at_period_end"])
        audit_record(actor=actor, actor_label=actor_label, action="subscription.cancel_now", obj=subscription,
                     changes={"at": now.isoformat(), "invoice": invoice.number if invoice else None})
        events.publish("subscription.canceled", {"subscription": subscription.pk,
                                                 "invoice": invoice.pk if invoice else None})
    return subscription


@dataclass(frozen=True)
class PlanChangePreview:
    """What a plan change would do now (``subscription_change_preview``)."""

    from_plan: Plan
    to_plan: Plan
    effective_at: datetime
    remaining_fraction: Decimal
    unused_credit: Decimal
    remaining_charge: Decimal
    credits_delta: Decimal
    included_remaining: Decimal
    overage_credits: Decimal
    overage_price: Decimal
    currency: str

    @property
    def net_fee(self) -> Decimal:
        """What the change adds to the period's invoice (negative: it lowers it)."""
        return self.remaining_charge - self.unused_credit + round_money(
            self.overage_credits * self.overage_price, self.currency)

    @property
    def included_after(self) -> Decimal:
        return max(self.included_remaining + self.credits_delta, ZERO)


def _preview(subscription: Subscription, plan: Plan, *, now: datetime) -> PlanChangePreview:
    current = subscription.plan
    if subscription.status not in LIVE_STATUSES:
        raise Conflict(f"Subscription #{subscription.pk} is {subscription.status}.",
                       details={"status": subscription.status})
    if plan.pk == current.pk:
        raise InvalidRequest(f"The subscription is already on {plan.code!r}.", details={"plan": "must differ"})
    if not plan.active:
        raise InvalidRequest(f"Plan {plan.code!r} is no longer offered.", details={"plan": plan.code})
    if plan.currency != current.currency or plan.months != current.months:
        raise InvalidRequest("A plan change keeps the currency and the period length.",
                             details={"plan": f"must be a {current.get_period_display().lower()} plan in "
                                              f"{current.currency}"})
    if subscription.cancel_at_period_end:
        raise Conflict("The subscription is set to cancel at period end.", details={"cancel_at_period_end": True})
    start, end = subscription.current_period_start, subscription.current_period_end
    if not start <= now < end:
        raise Conflict("The current period has ended; close it before changing the plan.",
                       details={"current_period_end": end.isoformat()})
    fee_share = billable_fraction(period_start=start, period_end=end, start=now, end=end,
                                  trial_ends_at=subscription.trial_ends_at)
    time_share = billable_fraction(period_start=start, period_end=end, start=now, end=end)
    period = subscription.periods.get(index=subscription.period_index)
    included_remaining = CreditGrant.objects.filter(
        pk__in=_period_grant_ids(period), status=CreditGrant.Status.ACTIVE).aggregate(t=Sum("remaining"))["t"] or ZERO
    overage = ZERO
    if current.overage_price > 0:
        overage = Wallet.objects.only("overage").get(pk=subscription.wallet_id).overage
    return PlanChangePreview(
        from_plan=current, to_plan=plan, effective_at=now, remaining_fraction=fee_share,
        unused_credit=round_money(current.base_fee * fee_share, current.currency),
        remaining_charge=round_money(plan.base_fee * fee_share, plan.currency),
        credits_delta=round_credits((plan.included_credits - current.included_credits) * time_share),
        included_remaining=included_remaining, overage_credits=overage, overage_price=current.overage_price,
        currency=current.currency,
    )


def subscription_change_preview(*, subscription_id: int, plan: Plan, now: datetime | None = None) -> PlanChangePreview:
    """What ``subscription_change_plan`` would bill and grant now; writes nothing.
    Raises as the change would."""
    subscription = Subscription.objects.select_related("plan", "customer").filter(pk=subscription_id).first()
    if subscription is None:
        raise NotFound(f"No subscription #{subscription_id}.", details={"subscription": "not found"})
    return _preview(subscription, plan, now=now or timezone.now())


def subscription_change_plan(
    *, subscription_id: int, plan: Plan, now: datetime | None = None, actor=None, actor_label: str = "",
) -> SubscriptionChange:
    """Move a live subscription to ``plan`` now, for the rest of the current period
    and after. In one transaction, under the subscription lock, then the grants'
    and the wallet's: overage used under the old plan is settled (billed at its
    price on the period's invoice); the included credits move by (new − old
    included) × the share of the period left — a new ``included`` grant, or an
    ``adjustment`` entry taking back at most the unused included credits; the
    wallet takes the new overage policy; the fee proration is recorded for the
    period's closing invoice (see the module docstring).

    Raises NotFound, Conflict (not live, set to cancel, period over) and
    InvalidRequest (same plan, inactive plan, other currency or period length)."""
    now = now or timezone.now()
    with transaction.atomic():
        subscription = _lock_subscription(subscription_id)
        preview = _preview(subscription, plan, now=now)
        period = subscription.periods.get(index=subscription.period_index)
        change = SubscriptionChange.objects.create(
            subscription=subscription, period=period, from_plan=preview.from_plan, to_plan=plan, effective_at=now,
            remaining_fraction=preview.remaining_fraction, unused_credit=preview.unused_credit,
            remaining_charge=preview.remaining_charge, credits_delta=preview.credits_delta,
            overage_credits=preview.overage_credits, overage_price=preview.overage_price,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        if preview.overage_credits > 0:
            _settle_overage(subscription, preview.overage_credits, preview.overage_price, now=now,
                            reason=f"Overage under {preview.from_plan.name}, billed with the period's invoice",
                            idempotency_key=f"subscription:{subscription.pk}:change:{change.pk}:overage")
        reason = f"Plan change {preview.from_plan.name} → {plan.name}, {_local_span(period)}"
        if preview.credits_delta > 0:
            change.included_grant = grant_create(
                wallet=subscription.wallet, kind=CreditGrant.Kind.INCLUDED, amount=preview.credits_delta,
                source=CreditGrant.Source.PLAN_PERIOD, effective_at=now, expires_at=period.ends_at,
                currency=plan.currency, reason=reason, requested_by=actor, actor_label=actor_label,
                require_approval=False, idempotency_key=f"subscription:{subscription.pk}:change:{change.pk}",
            )
            change.save(update_fields=["included_grant"])
        elif preview.credits_delta < 0:
            _take_back_included(subscription, period, -preview.credits_delta, reason=reason,
                                reference=f"subscription:{subscription.pk}:change:{change.pk}", now=now)
        _apply_overage_policy(lock_wallet(subscription.wallet_id), plan)
        subscription.plan = plan
        subscription.save(update_fields=["plan"])
        audit_record(actor=actor, actor_label=actor_label, action="subscription.change_plan", obj=subscription,
                     changes={"plan": [preview.from_plan.code, plan.code], "remaining_fraction": preview.remaining_fraction,
                              "unused_credit": preview.unused_credit, "remaining_charge": preview.remaining_charge,
                              "credits_delta": preview.credits_delta, "overage_credits": preview.overage_credits})
        events.publish("subscription.plan_changed", {
            "subscription": subscription.pk, "from": preview.from_plan.code, "to": plan.code,
            "credits_delta": str(preview.credits_delta)})
    return change


def _take_back_included(subscription: Subscription, period: SubscriptionPeriod, credits: Decimal, *, reason: str,
                        reference: str, now: datetime) -> Decimal:
    """Remove up to ``credits`` unused credits from the period's usable included
    grants (``adjustment`` entries); consumed credits are never taken back."""
    locked = lock_grants(_period_grant_ids(period))
    usable = [grant for grant in locked.values() if grant.is_usable(now)]
    usable.sort(key=lambda grant: (grant.effective_at, grant.pk), reverse=True)  # the latest top-up first
    allocations, short = allocate(grants=usable, amount=credits)
    if not allocations:
        return ZERO
    wallet = lock_wallet(subscription.wallet_id)
    append_entries(wallet=wallet, movements=debit_grants(allocations=allocations,
                                                         entry_type=LedgerEntry.Type.ADJUSTMENT,
                                                         reference=reference, memo=reason[:500]))
    watch_balance(wallet, delta=short - credits, cause="adjustment")
    return credits - short


def _status_for(subscription: Subscription, *, now: datetime) -> str:
    """trialing before the trial's end, past_due while a period invoice is overdue, else active."""
    overdue = Invoice.objects.filter(subscription_period__subscription=subscription, status=Invoice.Status.ISSUED,
                                     due_at__lte=now).exists()
    if overdue:
        return Subscription.Status.PAST_DUE
    if subscription.trial_ends_at is not None and subscription.trial_ends_at > now:
        return Subscription.Status.TRIALING
    return Subscription.Status.ACTIVE


def subscription_refresh_status(*, subscription_id: int, now: datetime | None = None) -> Subscription:
    """Set a live subscription's status from the clock and its invoices:
    ``trialing`` → ``active`` when the trial ends, ``past_due`` while a period
    invoice is overdue, back to ``active`` once it is paid (or voided).
    Idempotent; a canceled subscription is left alone. Publishes
    ``subscription.status_changed`` on a change."""
    now = now or timezone.now()
    with transaction.atomic():
        subscription = _lock_subscription(subscription_id)
        if subscription.status not in LIVE_STATUSES:
            return subscription
        status = _status_for(subscription, now=now)
        if status != subscription.status:
            before, subscription.status = subscription.status, status
            subscription.save(update_fields=["status"])
            audit_record(actor_label="subscription status", action="subscription.status", obj=subscription,
                         changes={"status": [before, status]})
            events.publish("subscription.status_changed", {
                "subscription": subscription.pk, "customer": subscription.customer_id, "from": before, "to": status})
    return subscription


def subscriptions_refresh_status(*, now: datetime | None = None, progress=None) -> int:
    """The beat job: refresh every subscription whose status the clock or its
    invoices may have changed (trial over, invoice overdue, past_due paid), one
    transaction each; safe to kill and rerun. Returns how many changed."""
    now = now or timezone.now()
    overdue = Invoice.objects.filter(status=Invoice.Status.ISSUED, due_at__lte=now)
    candidates = (
        set(Subscription.objects.filter(status=Subscription.Status.TRIALING, trial_ends_at__lte=now)
            .values_list("pk", flat=True))
        | set(Subscription.objects.filter(status__in=LIVE_STATUSES, periods__invoice__in=overdue)
              .exclude(status=Subscription.Status.PAST_DUE).values_list("pk", flat=True))
        | set(Subscription.objects.filter(status=Subscription.Status.PAST_DUE).values_list("pk", flat=True))
    )
    changed = 0
    for subscription_id in sorted(candidates):
        before = Subscription.objects.only("status").get(pk=subscription_id).status
        changed += subscription_refresh_status(subscription_id=subscription_id, now=now).status != before
        if progress:
            progress(1)
    return changed
