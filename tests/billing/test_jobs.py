"""The clock-driven jobs (DESIGN.md §4.8): running twice, or killing a run
midway and running again, leaves the same state as running once; each run is
recorded as a JobRun; the beat schedule in code reaches django-celery-beat."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from billing import events, tasks
from billing.models import CreditGrant, JobRun, LedgerEntry, OutboxEvent, Reservation
from billing.services import grants as grant_services
from billing.services.reservations import reservation_create
from billing.services.usage import ChargeRequest, usage_charge
from config.schedule import SCHEDULE
from tests.conftest import assert_ledger_consistent
from tests.factories import funded_wallet, grant

pytestmark = pytest.mark.django_db


def _past_due_wallets(count: int) -> list:
    """``count`` wallets, each with one grant that expired an hour ago (60 credits
    left) and one that is still good (40 credits)."""
    now = timezone.now()
    wallets = []
    for _ in range(count):
        wallet = funded_wallet("40", expires_at=now + timedelta(days=30))
        grant(wallet, "60", kind="promotional", effective_at=now - timedelta(days=10),
              expires_at=now - timedelta(hours=1))
        wallets.append(wallet)
    return wallets


def _expiry_entries(wallets) -> list[tuple[int, Decimal]]:
    return sorted(LedgerEntry.objects.filter(wallet__in=wallets, type=LedgerEntry.Type.EXPIRY)
                  .values_list("wallet_id", "amount"))


def test_grant_expiry_twice_is_once():
    wallets = _past_due_wallets(3)

    assert tasks.grants_expire_due() == 3
    assert tasks.grants_expire_due() == 0

    assert _expiry_entries(wallets) == sorted((w.pk, Decimal("-60")) for w in wallets)
    for wallet in wallets:
        assert_ledger_consistent(wallet)
        assert wallet.ledger_balance == Decimal("40")
        assert set(wallet.grants.values_list("status", flat=True)) == {"active", "expired"}
    first, second = JobRun.objects.filter(name="grants_expire_due").order_by("started_at")
    assert (first.status, first.total, first.done, first.detail["expired"]) == ("succeeded", 3, 3, 3)
    assert (second.status, second.total, second.done, second.detail["expired"]) == ("succeeded", 0, 0, 0)
    assert first.finished_at is not None


def test_grant_expiry_killed_midway_then_rerun_is_once(monkeypatch):
    wallets = _past_due_wallets(4)
    real_expire = grant_services.grant_expire
    calls = []

    def dies_on_third_grant(**kwargs):
        calls.append(kwargs["grant_id"])
        if len(calls) == 3:
            raise SystemExit("worker killed")
        return real_expire(**kwargs)

    monkeypatch.setattr(grant_services, "grant_expire", dies_on_third_grant)
    with pytest.raises(SystemExit):
        tasks.grants_expire_due()
    assert len(_expiry_entries(wallets)) == 2  # the two grants before the kill stay expired
    monkeypatch.setattr(grant_services, "grant_expire", real_expire)

    assert tasks.grants_expire_due() == 2

    assert _expiry_entries(wallets) == sorted((w.pk, Decimal("-60")) for w in wallets)
    for wallet in wallets:
        assert_ledger_consistent(wallet)
        assert wallet.ledger_balance == Decimal("40")
    killed, rerun = JobRun.objects.filter(name="grants_expire_due").order_by("started_at")
    assert killed.status == "failed" and "worker killed" in killed.detail["error"]
    assert (killed.total, killed.done) == (4, 2)
    assert (rerun.status, rerun.done, rerun.detail["expired"]) == ("succeeded", 2, 2)


def test_service_on_a_subset_then_full_run_matches_a_single_run():
    """Killed after some grants (the service commits per grant): the rerun finishes the rest."""
    wallets = _past_due_wallets(3)
    first_grant = CreditGrant.objects.filter(wallet=wallets[0], kind="promotional").get()
    assert grant_services.grant_expire(grant_id=first_grant.pk) is True

    assert tasks.grants_expire_due() == 2
    assert _expiry_entries(wallets) == sorted((w.pk, Decimal("-60")) for w in wallets)
    for wallet in wallets:
        assert_ledger_consistent(wallet)


def test_grant_not_yet_expired_is_left_alone():
    wallet = funded_wallet("100", expires_at=timezone.now() + timedelta(minutes=5))
    assert tasks.grants_expire_due() == 0
    assert not LedgerEntry.objects.filter(wallet=wallet, type=LedgerEntry.Type.EXPIRY).exists()
    assert wallet.grants.get().status == "active"


def test_hold_release_twice_is_once():
    now = timezone.now()
    wallet = funded_wallet("100", effective_at=now - timedelta(days=1))
    stale = reservation_create(customer=wallet.customer, wallet_id=wallet.pk, amount=Decimal("30"),
                               ttl_seconds=60, now=now - timedelta(minutes=5))
    live = reservation_create(customer=wallet.customer, wallet_id=wallet.pk, amount=Decimal("20"), ttl_seconds=600)

    assert tasks.reservations_expire_due() == 1
    assert tasks.reservations_expire_due() == 0

    stale.refresh_from_db()
    live.refresh_from_db()
    assert stale.status == Reservation.Status.EXPIRED and stale.closed_at is not None
    assert live.status == Reservation.Status.OPEN
    assert_ledger_consistent(wallet)
    runs = list(JobRun.objects.filter(name="reservations_expire_due").order_by("started_at")
                .values_list("status", "done"))
    assert runs == [("succeeded", 1), ("succeeded", 0)]


def test_outbox_redelivers_old_undelivered_events_once(monkeypatch):
    delivered = []
    monkeypatch.setitem(events._subscribers, "test.job", [lambda topic, payload: delivered.append(payload["n"])])
    old = timezone.now() - timedelta(minutes=5)
    stuck = OutboxEvent.objects.create(topic="test.job", payload={"n": 1}, created_at=old)
    fresh = OutboxEvent.objects.create(topic="test.job", payload={"n": 2})  # its after-commit delivery may still come
    done = OutboxEvent.objects.create(topic="test.job", payload={"n": 3}, created_at=old, dispatched_at=old)

    assert tasks.outbox_dispatch_pending() == 1
    assert tasks.outbox_dispatch_pending() == 0

    assert delivered == [1]
    stuck.refresh_from_db()
    fresh.refresh_from_db()
    done.refresh_from_db()
    assert stuck.dispatched_at is not None and fresh.dispatched_at is None and done.dispatched_at == old


def test_outbox_keeps_an_event_whose_subscriber_fails(monkeypatch):
    def broken(topic, payload):
        raise RuntimeError("CRM is down")

    monkeypatch.setitem(events._subscribers, "test.job", [broken])
    stuck = OutboxEvent.objects.create(topic="test.job", payload={}, created_at=timezone.now() - timedelta(minutes=5))

    assert tasks.outbox_dispatch_pending() == 0
    stuck.refresh_from_db()
    assert stuck.dispatched_at is None
    run = JobRun.objects.get(name="outbox_dispatch_pending")
    assert run.detail == {"delivered": 0, "failed": 1} and run.status == "succeeded"


def test_tasks_are_late_acked_and_retry_on_database_errors():
    from django.db import OperationalError

    for task in (tasks.grants_expire_due, tasks.reservations_expire_due, tasks.outbox_dispatch_pending):
        assert task.acks_late is True
        assert OperationalError in task.autoretry_for


# --- The beat schedule ---------------------------------------------------------

def _synced() -> dict[str, PeriodicTask]:
    return {task.name: task for task in PeriodicTask.objects.select_related("interval")}


def test_sync_schedules_loads_the_code_schedule_and_is_idempotent():
    call_command("sync_schedules", stdout=StringIO())
    first = _synced()
    call_command("sync_schedules", stdout=StringIO())
    second = _synced()

    assert set(first) == {job.name for job in SCHEDULE}
    for job in SCHEDULE:
        task = second[job.name]
        assert task.task == job.task and task.enabled
        assert task.interval.schedule.run_every == job.every
        assert task.date_changed == first[job.name].date_changed  # the second run wrote nothing
    assert second["Expire grants past their expiry"].task == "billing.tasks.grants_expire_due"
    assert second["Release expired holds"].interval.schedule.run_every == timedelta(minutes=1)


def test_sync_schedules_keeps_a_staff_pause_and_restores_the_code_interval():
    call_command("sync_schedules", stdout=StringIO())
    task = PeriodicTask.objects.get(name="Expire grants past their expiry")
    task.enabled = False
    task.interval = IntervalSchedule.objects.create(every=7, period=IntervalSchedule.HOURS)
    task.save()
    hand_made = PeriodicTask.objects.create(
        name="Someone's own job", task="billing.tasks.outbox_dispatch_pending", interval=task.interval
    )

    call_command("sync_schedules", stdout=StringIO())

    task.refresh_from_db()
    assert task.enabled is False
    assert task.interval.schedule.run_every == timedelta(minutes=5)
    assert PeriodicTask.objects.filter(pk=hand_made.pk).exists()


def test_sync_schedules_removes_jobs_no_longer_in_code():
    call_command("sync_schedules", stdout=StringIO())
    PeriodicTask.objects.filter(name="Release expired holds").update(name="Retired job")

    call_command("sync_schedules", stdout=StringIO())

    assert not PeriodicTask.objects.filter(name="Retired job").exists()
    assert set(_synced()) == {job.name for job in SCHEDULE}


def test_expiry_of_a_partly_used_grant_removes_only_what_is_left(feature):
    wallet = funded_wallet("0")
    now = timezone.now()
    grant(wallet, "100", kind="promotional", effective_at=now - timedelta(days=3), expires_at=now - timedelta(minutes=1))
    two_days_ago = now - timedelta(days=2)
    result = usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                        quantity=Decimal("35"), event_id="before-expiry", occurred_at=two_days_ago),
                          now=two_days_ago)
    assert result.status == "charged"

    assert tasks.grants_expire_due() == 1

    assert _expiry_entries([wallet]) == [(wallet.pk, Decimal("-65"))]
    assert_ledger_consistent(wallet)
    assert wallet.ledger_balance == 0


def test_a_killed_runs_row_is_marked_interrupted_by_the_next_run():
    # A process killed mid-job leaves its row "running" and, with its connection gone, no lock.
    orphan = JobRun.objects.create(name="grants_expire_due", status="running", done=3, total=10)

    tasks.grants_expire_due()

    orphan.refresh_from_db()
    assert orphan.status == "interrupted" and orphan.finished_at is not None
    assert orphan.done == 3, "the progress it reached stays visible"
    assert JobRun.objects.filter(name="grants_expire_due", status="succeeded").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_run_alive_in_another_connection_is_not_marked_interrupted():
    import threading

    from django.db import connection

    from billing.services.jobs import job_run, runs_mark_interrupted

    started, release = threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def long_job() -> None:
        try:
            with job_run("long_job") as progress:
                seen["run"] = progress.run.pk
                started.set()
                release.wait(timeout=30)
        finally:
            connection.close()

    worker = threading.Thread(target=long_job)
    worker.start()
    try:
        assert started.wait(timeout=30)
        assert runs_mark_interrupted() == 0
        assert JobRun.objects.get(pk=seen["run"]).status == "running"
    finally:
        release.set()
        worker.join(timeout=30)
    assert JobRun.objects.get(pk=seen["run"]).status == "succeeded"
    with job_run("next_job"):
        pass
    assert JobRun.objects.get(pk=seen["run"]).status == "succeeded"
