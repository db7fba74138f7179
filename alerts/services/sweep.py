"""The beat sweep: the safety net behind the crossing hook.

Every few minutes it re-evaluates every wallet at the current balance and clock
(expiry-driven drops that no ledger entry announced yet, days-left levels,
marks that drifted), sends expiring-soon notices, re-queues deliveries and
top-ups that should have happened, and closes top-ups finance rejected. Each
wallet is its own transaction; every step is idempotent, so running the sweep
twice sends each notice once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Q
from django.utils import timezone

from alerts.models import AlertRule, AutoTopUpRun, EventType, Severity, default_expiring_soon_days
from alerts.services import evaluation
from alerts.services.auto_top_up import auto_top_up_runs_reconcile
from alerts.services.notifications import notifications_due, notify
from billing.models import CreditGrant, Wallet

STUCK_AFTER = timedelta(minutes=2)
DEFAULT_EXPIRING_SOON = default_expiring_soon_days()


@dataclass
class SweepResult:
    wallets: int = 0
    changed: int = 0
    expiring_notices: int = 0
    requeued_notifications: int = 0
    requeued_top_ups: int = 0
    rejected_top_ups: int = 0


def grants_expiring_soon_notify(*, now: datetime) -> int:
    """One ``grant.expiring_soon`` notice per grant (and expiry date) with credits
    left, N days before it expires, N per grant kind from the wallet's rule."""
    shared = evaluation.shared_rules()
    rules: dict[int, object] = {}
    horizon = max([days for rule in AlertRule.objects.filter(active=True).only("expiring_soon_days")
                   for days in (rule.expiring_soon_days or {}).values()] + list(DEFAULT_EXPIRING_SOON.values()))
    candidates = CreditGrant.objects.filter(
        status=CreditGrant.Status.ACTIVE, remaining__gt=0, expires_at__gt=now,
        expires_at__lte=now + timedelta(days=horizon), effective_at__lte=now,
    ).select_related("wallet", "wallet__customer").order_by("expires_at")
    sent = 0
    for grant in candidates.iterator(chunk_size=500):
        if grant.wallet_id not in rules:
            rules[grant.wallet_id] = evaluation.rule_for_wallet(grant.wallet, shared=shared)
        rule = rules[grant.wallet_id]
        days = (rule.expiring_soon_days if rule else DEFAULT_EXPIRING_SOON).get(grant.kind)
        if not days or grant.expires_at > now + timedelta(days=days):
            continue
        wallet, customer = grant.wallet, grant.wallet.customer
        created = notify(
            event_type=EventType.GRANT_EXPIRING_SOON, customer=customer, wallet=wallet, rule=rule,
            severity=Severity.WARNING, now=now, dedupe=f"grant.expiring_soon:{grant.pk}:{int(grant.expires_at.timestamp())}",
            payload={"customer": customer.external_id, "customer_name": customer.name, "wallet": wallet.pk,
                     "wallet_name": wallet.name, "grant": grant.pk, "kind": grant.kind,
                     "remaining": str(grant.remaining), "original": str(grant.original_amount),
                     "expires_at": grant.expires_at.isoformat(), "expires_on": grant.expires_at.date().isoformat(),
                     "days_left": (grant.expires_at - now).days},
        )
        sent += bool(created)
    return sent


def alerts_sweep(*, now: datetime | None = None, batch_size: int = 500, progress=None) -> SweepResult:
    from alerts.tasks import auto_top_up_execute, deliver_notification

    now = now or timezone.now()
    result = SweepResult()
    shared = evaluation.shared_rules()
    last_pk = 0
    while ids := list(Wallet.objects.filter(pk__gt=last_pk).order_by("pk").values_list("pk", flat=True)[:batch_size]):
        for wallet_id in ids:
            plan = evaluation.wallet_refresh(wallet_id=wallet_id, now=now, shared=shared)
            result.wallets += 1
            result.changed += bool(plan and (plan.triggered or plan.recovered or plan.top_up_breach))
            if progress:
                progress(1)
        last_pk = ids[-1]
    result.expiring_notices = grants_expiring_soon_notify(now=now)
    for notification_id in notifications_due(now=now).values_list("pk", flat=True):
        deliver_notification.delay(notification_id)
        result.requeued_notifications += 1
    stuck = AutoTopUpRun.objects.filter(Q(status=AutoTopUpRun.Status.QUEUED), created_at__lte=now - STUCK_AFTER)
    for run_id in stuck.values_list("pk", flat=True):
        auto_top_up_execute.delay(run_id)
        result.requeued_top_ups += 1
    result.rejected_top_ups = auto_top_up_runs_reconcile(now=now)
    return result
