"""Auto top-up: a wallet that refills itself when it falls to its threshold.

The crossing hook (``evaluation.apply_plan``) records one ``AutoTopUpRun`` per
breach under the wallet's row lock and queues ``auto_top_up_execute`` after
the charge commits; credits never move inside the charge transaction. The
purchase goes through billing (``pack_purchase`` with source ``auto_top_up``,
its grant waiting for approval or payment where the settings say so), so the
grant, its cost basis from the pack, the purchase record and the ledger entries
are billing's own.
"""

from __future__ import annotations

import math
import zoneinfo
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from alerts import selectors
from alerts.models import AutoTopUp, AutoTopUpRun, EventType, Severity
from alerts.services import evaluation
from alerts.services.notifications import notify
from billing.errors import BillingError, Conflict
from billing.models import CreditGrant, Wallet
from billing.numbers import ZERO, round_credits
from billing.services.grants import grant_void
from billing.services.locks import lock_wallet
from billing.services.packs import pack_purchase

ACTOR = "auto top-up"
BUSY_STATUSES = (AutoTopUpRun.Status.AWAITING_PAYMENT, AutoTopUpRun.Status.PENDING_APPROVAL)
COOLDOWN_STATUSES = (AutoTopUpRun.Status.SUCCEEDED, *BUSY_STATUSES)


def queue_top_up(run_id: int) -> None:
    from alerts.tasks import auto_top_up_execute as task

    transaction.on_commit(lambda: task.delay(run_id))


def month_start(wallet: Wallet, now: datetime) -> datetime:
    local = now.astimezone(zoneinfo.ZoneInfo(wallet.customer.timezone))
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _staff_payload(wallet: Wallet, **extra) -> dict:
    return {"customer": wallet.customer.external_id, "customer_name": wallet.customer.name, "wallet": wallet.pk,
            "wallet_name": wallet.name, **{k: str(v) for k, v in extra.items()}}


def _skip(run: AutoTopUpRun, reason: str, now: datetime) -> AutoTopUpRun:
    run.status = AutoTopUpRun.Status.SKIPPED
    run.detail = reason[:255]
    run.finished_at = now
    run.save(update_fields=["status", "detail", "finished_at"])
    return run


def auto_top_up_execute(*, run_id: int, now: datetime | None = None) -> AutoTopUpRun | None:
    """Carry out the top-up of one breach.

    Guarantees: at most one purchase per wallet and breach — the run is decided
    under the wallet's row lock and bought with the run's idempotency key
    (``auto-top-up:<wallet>:<breach>``), so duplicate or concurrent task
    deliveries do nothing more. Guards, each recorded on the run as ``skipped``:
    disabled; balance already back above the threshold; an earlier top-up still
    awaiting payment or approval; cooldown; monthly caps on count and credits
    (which also send finance one "cap reached" notice per month). A purchase that
    billing refuses counts as a failure; after ``max_consecutive_failures`` the
    auto top-up turns itself off and finance is told.
    """
    now = now or timezone.now()
    run = AutoTopUpRun.objects.filter(pk=run_id).only("wallet_id", "status").first()
    if run is None or run.status != AutoTopUpRun.Status.QUEUED:
        return run
    with transaction.atomic():
        wallet = lock_wallet(run.wallet_id)
        run = AutoTopUpRun.objects.select_for_update(of=("self",)).select_related(
            "auto_top_up", "auto_top_up__pack").get(pk=run_id)
        if run.status != AutoTopUpRun.Status.QUEUED:
            return run
        auto: AutoTopUp = run.auto_top_up
        pack = auto.pack
        if not auto.enabled:
            return _skip(run, "Auto top-up is off.", now)
        available = selectors.wallet_available(wallet, at=now)
        if available > auto.threshold:
            return _skip(run, f"Balance {available} is back above the threshold.", now)
        earlier = AutoTopUpRun.objects.filter(wallet=wallet).exclude(pk=run.pk)
        if earlier.filter(status__in=BUSY_STATUSES).exists():
            return _skip(run, "An earlier top-up still awaits payment or approval.", now)
        if auto.cooldown and earlier.filter(status__in=COOLDOWN_STATUSES, created_at__gt=now - auto.cooldown).exists():
            return _skip(run, f"Cooldown: the last top-up was less than {auto.cooldown} ago.", now)

        if auto.mode == AutoTopUp.Mode.TARGET:
            shortfall = max((auto.target_balance or ZERO) - available, ZERO)
            quantity = max(1, math.ceil(shortfall / pack.credits))
        else:
            quantity = auto.pack_quantity
        credits = round_credits(pack.credits * quantity)
        start = month_start(wallet, now)
        count, month_credits = selectors.auto_top_up_month_totals(wallet.pk, month_start=start)
        over_count = auto.monthly_max_count is not None and count + 1 > auto.monthly_max_count
        over_credits = auto.monthly_max_credits is not None and month_credits + credits > auto.monthly_max_credits
        if over_count or over_credits:
            notify(event_type=EventType.TOP_UP_RUNAWAY, customer=wallet.customer, wallet=wallet,
                   severity=Severity.CRITICAL, now=now, dedupe=f"auto-top-up-cap:{wallet.pk}:{start:%Y-%m}",
                   payload=_staff_payload(wallet, count=count, credits=month_credits,
                                          max_count=auto.monthly_max_count or "-",
                                          max_credits=auto.monthly_max_credits or "-", month=f"{start:%Y-%m}"))
            return _skip(run, f"Monthly cap reached ({count} top-ups, {month_credits} credits this month).", now)

        run.quantity, run.credits = quantity, credits
        try:
            with transaction.atomic():
                purchase = pack_purchase(wallet=wallet, pack=pack, quantity=quantity, actor_label=ACTOR,
                                         idempotency_key=run.idempotency_key, source=CreditGrant.Source.AUTO_TOP_UP,
                                         pending_payment=auto.await_payment, require_approval=auto.require_approval)
                run.purchase, run.grant = purchase, purchase.grant
                if auto.require_approval:
                    run.status = AutoTopUpRun.Status.PENDING_APPROVAL
                elif auto.await_payment:
                    run.status = AutoTopUpRun.Status.AWAITING_PAYMENT
                else:
                    run.status = AutoTopUpRun.Status.SUCCEEDED
        except BillingError as exc:
            run.status = AutoTopUpRun.Status.FAILED
            run.detail = exc.message[:255]
            run.finished_at = now
            run.save(update_fields=["status", "detail", "finished_at", "quantity", "credits"])
            _count_failure(auto=auto, wallet=wallet, reason=exc.message, now=now)
            return run
        if run.status == AutoTopUpRun.Status.SUCCEEDED:
            run.finished_at = now
            if auto.consecutive_failures:
                AutoTopUp.objects.filter(pk=auto.pk).update(consecutive_failures=0)
        run.save(update_fields=["status", "quantity", "credits", "grant", "purchase", "finished_at"])
        if run.status == AutoTopUpRun.Status.PENDING_APPROVAL:
            notify(event_type=EventType.TOP_UP_AWAITING_APPROVAL, customer=wallet.customer, wallet=wallet,
                   severity=Severity.WARNING, now=now, dedupe=f"auto-top-up-approval:{run.pk}",
                   payload=_staff_payload(wallet, credits=credits, run=run.pk, grant=run.grant_id))
    return run


def _count_failure(*, auto: AutoTopUp, wallet: Wallet, reason: str, now: datetime) -> None:
    auto = AutoTopUp.objects.select_for_update().get(pk=auto.pk)
    auto.consecutive_failures += 1
    fields = ["consecutive_failures", "updated_at"]
    if auto.enabled and auto.consecutive_failures >= auto.max_consecutive_failures:
        auto.enabled = False
        auto.disabled_reason = f"{auto.consecutive_failures} consecutive failures; last: {reason}"[:255]
        fields += ["enabled", "disabled_reason"]
        notify(event_type=EventType.TOP_UP_DISABLED, customer=wallet.customer, wallet=wallet,
               severity=Severity.CRITICAL, now=now, dedupe=f"auto-top-up-disabled:{auto.pk}:{int(now.timestamp())}",
               payload=_staff_payload(wallet, failures=auto.consecutive_failures, reason=reason))
    auto.save(update_fields=fields)


def auto_top_up_payment_failed(*, run_id: int, reason: str = "Payment failed.",
                               now: datetime | None = None) -> AutoTopUpRun:
    """Record that the payment of a top-up awaiting payment failed: its grant is
    voided (it never became usable) and the failure counts towards turning the
    auto top-up off."""
    now = now or timezone.now()
    with transaction.atomic():
        # Lock order as billing's: the grant, then the wallet (grant_void), then alerts rows.
        grant_id = AutoTopUpRun.objects.filter(pk=run_id).values_list("grant_id", flat=True).first()
        if grant_id is not None and CreditGrant.objects.filter(
                pk=grant_id, status=CreditGrant.Status.PENDING_PAYMENT).exists():
            grant_void(grant_id=grant_id, actor_label=ACTOR, reason=reason)
        run = AutoTopUpRun.objects.select_for_update(of=("self",)).select_related("auto_top_up", "wallet",
                                                                                   "wallet__customer").get(pk=run_id)
        if run.status != AutoTopUpRun.Status.AWAITING_PAYMENT:
            raise Conflict(f"Top-up run #{run.pk} is {run.status}, not awaiting payment.")
        run.status = AutoTopUpRun.Status.PAYMENT_FAILED
        run.detail = reason[:255]
        run.finished_at = now
        run.save(update_fields=["status", "detail", "finished_at"])
        _count_failure(auto=run.auto_top_up, wallet=run.wallet, reason=reason, now=now)
    return run


def auto_top_up_grant_settled(*, grant_id: int, now: datetime | None = None) -> AutoTopUpRun | None:
    """A top-up's grant became active (payment recorded or finance approved it):
    the run succeeded and the failure count starts again. Idempotent."""
    now = now or timezone.now()
    run = AutoTopUpRun.objects.filter(grant_id=grant_id).only("wallet_id").first()
    if run is None:
        return None
    with transaction.atomic():
        lock_wallet(run.wallet_id)  # lock order: wallet, then alerts rows
        run = AutoTopUpRun.objects.select_for_update(of=("self",)).get(pk=run.pk)
        if run.status not in BUSY_STATUSES:
            return run
        run.status = AutoTopUpRun.Status.SUCCEEDED
        run.finished_at = now
        run.save(update_fields=["status", "finished_at"])
        AutoTopUp.objects.filter(pk=run.auto_top_up_id).update(consecutive_failures=0)
    return run


def auto_top_up_runs_reconcile(*, now: datetime | None = None) -> int:
    """Close runs whose pending grant finance rejected. Returns how many."""
    now = now or timezone.now()
    closed = 0
    for run in AutoTopUpRun.objects.filter(status=AutoTopUpRun.Status.PENDING_APPROVAL,
                                           grant__status=CreditGrant.Status.REJECTED):
        closed += AutoTopUpRun.objects.filter(pk=run.pk, status=AutoTopUpRun.Status.PENDING_APPROVAL).update(
            status=AutoTopUpRun.Status.REJECTED, finished_at=now, detail="Finance rejected the grant.")
    return closed


def auto_top_up_set(*, wallet: Wallet, **fields) -> AutoTopUp:
    """Create or change a wallet's auto top-up settings (validated with the model's clean()),
    then re-evaluate the wallet so billing watches the new threshold."""
    with transaction.atomic():
        lock_wallet(wallet.pk)
        auto = AutoTopUp.objects.filter(wallet=wallet).first() or AutoTopUp(wallet=wallet)
        for name, value in fields.items():
            setattr(auto, name, value)
        if fields.get("enabled"):
            auto.disabled_reason = ""
            auto.consecutive_failures = 0
        auto.full_clean(exclude=["wallet"])
        auto.save()
        # New threshold, new marks; a wallet already at or below it breaches now.
        locked = lock_wallet(wallet.pk)
        evaluation.wallet_evaluate(wallet=locked, available=selectors.wallet_available(locked, at=timezone.now()),
                                   now=timezone.now(), cause="settings")
    return auto
