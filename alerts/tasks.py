"""Celery tasks of the alerts app: thin, idempotent, ``acks_late``; each takes
ids, calls one service, and is queued with ``transaction.on_commit``."""

from __future__ import annotations

from celery import shared_task
from django.db import InterfaceError, OperationalError

from alerts.services import auto_top_up, evaluation, notifications, sweep

RETRYING = {
    "acks_late": True,
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": True,
    "retry_backoff_max": 300,
    "max_retries": 5,
}


@shared_task(name="alerts.tasks.deliver_notification", bind=True, acks_late=True, max_retries=None)
def deliver_notification(self, notification_id: int, expected_attempts: int | None = None) -> str:
    """One delivery attempt; a failure schedules the next with exponential backoff."""
    outcome = notifications.notification_deliver(notification_id=notification_id,
                                                  expected_attempts=expected_attempts)
    if outcome.outcome == "retry":
        raise self.retry(args=(notification_id, outcome.attempts), kwargs={}, countdown=outcome.retry_in)
    return outcome.outcome


@shared_task(name="alerts.tasks.auto_top_up_execute", **RETRYING)
def auto_top_up_execute(run_id: int) -> str | None:
    run = auto_top_up.auto_top_up_execute(run_id=run_id)
    return run.status if run else None


@shared_task(name="alerts.tasks.wallet_refresh", **RETRYING)
def wallet_refresh(wallet_id: int, cause: str = "refresh") -> None:
    evaluation.wallet_refresh(wallet_id=wallet_id, cause=cause)


@shared_task(name="alerts.tasks.alerts_sweep", **RETRYING)
def alerts_sweep() -> dict:
    """Beat: re-evaluate wallets, expiring-soon notices, missed deliveries and top-ups."""
    from billing.models import Wallet
    from billing.services.jobs import job_run

    with job_run("alerts_sweep") as job:
        job.set_total(Wallet.objects.count())
        result = sweep.alerts_sweep(progress=job.advance)
        job.note(**result.__dict__)
    return result.__dict__
