"""Celery tasks for billing's clock-driven jobs (scheduled in ``config/schedule.py``).

Each task is thin: it takes ids or nothing, calls one service, records a
``JobRun`` so staff see progress in the admin, and retries on database
connection errors. They are idempotent and safe to kill mid-run (the services
commit per grant, per event), and run with ``acks_late`` so a job lost with its
worker is delivered again.
"""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from billing import events
from billing.models import CreditGrant, OutboxEvent
from billing.services import grants, reservations
from billing.services.jobs import job_run

RETRYING = {
    "acks_late": True,
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": True,
    "retry_backoff_max": 300,
    "max_retries": 5,
}
OUTBOX_REDELIVERY_AGE = timedelta(minutes=1)
OUTBOX_BATCH = 500


def _counted_job(name: str, service, *, counted: str) -> int:
    """Run ``service(now=..., progress=...)`` as the job ``name``: its total is
    the steps it reported, its note the count it returned (as ``counted``)."""
    now = timezone.now()
    with job_run(name) as job:
        count = service(now=now, progress=job.advance)
        job.set_total(job.run.done)
        job.note(**{counted: count, "as_of": now.isoformat()})
    return count


@shared_task(name="billing.tasks.grants_expire_due", **RETRYING)
def grants_expire_due() -> int:
    """Write the expiry entries of every grant past its expiry. Returns how many expired now."""
    now = timezone.now()
    with job_run("grants_expire_due") as job:
        job.set_total(CreditGrant.objects.filter(status=CreditGrant.Status.ACTIVE, expires_at__lte=now).count())
        expired = grants.grants_expire_due(now=now, progress=job.advance)
        job.note(expired=expired, as_of=now.isoformat())
    return expired


@shared_task(name="billing.tasks.reservations_expire_due", **RETRYING)
def reservations_expire_due() -> int:
    """Mark open holds past their TTL as expired. Returns how many."""
    now = timezone.now()
    with job_run("reservations_expire_due") as job:
        released = reservations.reservations_expire_due(now=now)
        job.set_total(released)
        job.advance(released)
        job.note(expired=released, as_of=now.isoformat())
    return released


@shared_task(name="billing.tasks.outbox_dispatch_pending", **RETRYING)
def outbox_dispatch_pending() -> int:
    """Deliver again the outbox events whose after-commit delivery did not
    succeed (older than a minute, still undispatched). Returns how many went out."""
    cutoff = timezone.now() - OUTBOX_REDELIVERY_AGE
    pending = OutboxEvent.objects.filter(dispatched_at__isnull=True, created_at__lte=cutoff)
    delivered = failed = 0
    with job_run("outbox_dispatch_pending") as job:
        job.set_total(pending.count())
        last_pk = 0
        while ids := list(pending.filter(pk__gt=last_pk).order_by("pk").values_list("pk", flat=True)[:OUTBOX_BATCH]):
            for event_id in ids:
                if events.dispatch(event_id):
                    delivered += 1
                else:
                    failed += 1
                job.advance()
            last_pk = ids[-1]
        job.note(delivered=delivered, failed=failed)
    return delivered


# SMTP failures (smtplib errors are OSErrors) are retried like database ones.
EMAIL_RETRYING = {**RETRYING, "autoretry_for": (OperationalError, InterfaceError, OSError)}


@shared_task(name="billing.tasks.invoice_email_send", **EMAIL_RETRYING)
def invoice_email_send(invoice_id: int) -> bool:
    """Email one issued invoice with its PDF (queued on commit by ``invoice_issue``). Sends at most once."""
    from billing.services.invoices import invoice_email_send as send

    return send(invoice_id=invoice_id)


@shared_task(name="billing.tasks.subscriptions_close_due", **RETRYING)
def subscriptions_close_due() -> int:
    """Close every subscription period that has ended (invoice, next period's credits). Returns how many."""
    from billing.services.plans import subscriptions_close_due as close_due

    now = timezone.now()
    with job_run("subscriptions_close_due") as job:
        closed = close_due(now=now, progress=job.advance)
        job.set_total(closed)
        job.note(closed=closed, as_of=now.isoformat())
    return closed


@shared_task(name="billing.tasks.subscriptions_refresh_status", **RETRYING)
def subscriptions_refresh_status() -> int:
    """Trials that ended turn active, overdue period invoices make subscriptions past_due. Returns how many changed."""
    from billing.services.plans import subscriptions_refresh_status as refresh

    return _counted_job("subscriptions_refresh_status", refresh, counted="changed")


@shared_task(name="billing.tasks.contracts_run_due", **RETRYING)
def contracts_run_due() -> int:
    """Release every due contract instalment and settle every due true-up, in date order. Returns the steps run."""
    from billing.services.contracts import contracts_run_due as run_due

    return _counted_job("contracts_run_due", run_due, counted="steps")


@shared_task(name="billing.tasks.revenue_check", **RETRYING)
def revenue_check() -> int:
    """Nightly: invariant 7 for every paid grant and the revenue report's reconciliation; on any
    difference finance is alerted (email, ``revenue.mismatch`` event, the report's banner). Returns
    the number of differences."""
    from billing.services import revenue

    now = timezone.now()
    with job_run(revenue.CHECK_JOB) as job:
        result = revenue.revenue_check(now=now, progress=job.advance)
        result.alerted = revenue.revenue_check_alert(result, now=now)
        job.note(**result.detail(), as_of=now.isoformat())
    return len(result.mismatches)


@shared_task(name="billing.tasks.credit_note_email_send", **EMAIL_RETRYING)
def credit_note_email_send(credit_note_id: int) -> bool:
    """Email one credit note with its PDF (queued on commit by ``refund_approve``). Sends at most once."""
    from billing.services.refunds import credit_note_email_send as send

    return send(credit_note_id=credit_note_id)
