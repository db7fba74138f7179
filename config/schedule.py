"""The clock-driven jobs, declared in code.

``python manage.py sync_schedules`` (run at every start) copies this table into
django-celery-beat's tables, where the DatabaseScheduler reads it and staff see
each job under *Periodic tasks* in the admin. A job a staff member paused there
(``enabled`` unticked) stays paused across syncs; everything else — task,
interval, description — follows this file. Other apps declare their jobs in
their own ``schedule.py`` and are listed in ``_all_jobs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class ScheduledJob:
    name: str
    task: str
    every: timedelta
    description: str
    # Beat sends at most one copy per interval; an undelivered copy older than
    # this is dropped (the next tick sends a fresh one), so a stopped worker
    # does not come back to a pile of identical jobs.
    expires_after: timedelta | None = None


BILLING_JOBS: tuple[ScheduledJob, ...] = (
    ScheduledJob(
        name="Expire grants past their expiry",
        task="billing.tasks.grants_expire_due",
        every=timedelta(minutes=5),
        description="Writes the expiry entry of every active grant whose expires_at has passed.",
        expires_after=timedelta(minutes=5),
    ),
    ScheduledJob(
        name="Release expired holds",
        task="billing.tasks.reservations_expire_due",
        every=timedelta(minutes=1),
        description="Marks open reservations past their TTL as expired (they already stopped counting).",
        expires_after=timedelta(minutes=1),
    ),
    ScheduledJob(
        name="Redeliver domain events",
        task="billing.tasks.outbox_dispatch_pending",
        every=timedelta(minutes=2),
        description="Hands undispatched outbox events older than a minute to their subscribers again.",
        expires_after=timedelta(minutes=2),
    ),
    ScheduledJob(
        name="Close subscription periods",
        task="billing.tasks.subscriptions_close_due",
        every=timedelta(minutes=15),
        description="Closes every plan period that has ended: expires its included credits, issues the invoice "
                    "(fee + overage) and grants the next period's credits. Idempotent per period.",
        expires_after=timedelta(minutes=15),
    ),
    ScheduledJob(
        name="Refresh subscription statuses",
        task="billing.tasks.subscriptions_refresh_status",
        every=timedelta(hours=1),
        description="Trialing subscriptions whose trial ended turn active; a subscription with an overdue period "
                    "invoice turns past_due (and active again once it is paid). Idempotent.",
        expires_after=timedelta(hours=1),
    ),
    ScheduledJob(
        name="Run contract instalments and true-ups",
        task="billing.tasks.contracts_run_due",
        every=timedelta(minutes=15),
        description="Releases every contract instalment that is due (invoice + contract credits) and settles every "
                    "due true-up (overage billed on a true-up invoice), in date order. Idempotent per step.",
        expires_after=timedelta(minutes=15),
    ),
    ScheduledJob(
        name="Check revenue against the ledger",
        task="billing.tasks.revenue_check",
        every=timedelta(days=1),
        description="Checks invariant 7 (recognized + deferred + breakage + refunded = money paid) for every paid "
                    "grant and the revenue report's reconciliation for this month and last; any difference is "
                    "emailed to finance, published as revenue.mismatch and shown on the revenue report.",
        expires_after=timedelta(hours=6),
    ),
)


def _all_jobs() -> tuple[ScheduledJob, ...]:
    from alerts.schedule import jobs as alerts_jobs

    return BILLING_JOBS + tuple(alerts_jobs())


SCHEDULE: tuple[ScheduledJob, ...] = _all_jobs()
