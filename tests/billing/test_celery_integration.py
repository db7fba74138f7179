"""A real Celery worker and beat, as separate processes, expire a grant exactly once.

They run against the broker named by CELERY_BROKER_URL when it is set (Redis on
the CI machine, say; a queue of their own keeps them apart from anything else on
it), otherwise against kombu's filesystem transport in a temporary folder, and
against this test's own database (the test commits its data: transaction=True).
Beat reads the schedule from django-celery-beat's tables as loaded by
``sync_schedules``; the expiry job is set to every second so that it runs
several times while we watch, and must still write one expiry entry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from billing.models import CreditGrant, JobRun, LedgerEntry
from tests.conftest import assert_ledger_consistent
from tests.factories import funded_wallet, grant

ROOT = Path(__file__).resolve().parents[2]
WAIT_SECONDS = 60
EXPIRY_JOB = "Expire grants past their expiry"


def _test_database_url() -> str:
    """DATABASE_URL (set by the embedded server or by the user) pointed at this test's database."""
    parts = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(parts._replace(path="/" + connection.settings_dict["NAME"]))


def _start(name: str, argv: list[str], env: dict, logs: Path) -> tuple[subprocess.Popen, Path]:
    log = logs / f"{name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", *argv], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    return process, log


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_and_beat_expire_a_due_grant_exactly_once(tmp_path):
    now = timezone.now()
    wallet = funded_wallet("25", expires_at=now + timedelta(days=30))
    due = grant(wallet, "75", kind="promotional", effective_at=now - timedelta(days=30),
                expires_at=now - timedelta(minutes=10))

    queue = f"creditdesk-test-{uuid.uuid4().hex[:12]}"
    call_command("sync_schedules", stdout=StringIO())
    every_second, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.filter(name=EXPIRY_JOB).update(interval=every_second, queue=queue)
    PeriodicTask.objects.exclude(name=EXPIRY_JOB).update(enabled=False)

    env = {**os.environ, "DATABASE_URL": _test_database_url(), "PYTHONUNBUFFERED": "1"}
    if not os.environ.get("CELERY_BROKER_URL"):
        env["CELERY_BROKER_URL"] = "filesystem://localhost/"
        env["CELERY_BROKER_DIR"] = str(tmp_path / "broker")
    worker, worker_log = _start("worker", ["worker", "-Q", queue, "-P", "solo", "--loglevel", "INFO",
                                           "--without-gossip", "--without-mingle", "--without-heartbeat",
                                           "--hostname", f"{queue}@localhost"], env, tmp_path)
    beat, beat_log = _start("beat", ["beat", "--loglevel", "INFO", "--max-interval", "1",
                                     "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler"], env, tmp_path)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            assert worker.poll() is None, worker_log.read_text()
            assert beat.poll() is None, beat_log.read_text()
            # Done once the job has expired the grant and then run again at least twice.
            expired = LedgerEntry.objects.filter(grant=due, type=LedgerEntry.Type.EXPIRY).exists()
            if expired and JobRun.objects.filter(name="grants_expire_due", status="succeeded").count() >= 3:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no expiry within {WAIT_SECONDS} s\n--- worker\n{worker_log.read_text()}"
                        f"\n--- beat\n{beat_log.read_text()}")
    finally:
        _stop(beat)
        _stop(worker)

    expiry = list(LedgerEntry.objects.filter(grant=due, type=LedgerEntry.Type.EXPIRY).values_list("amount", flat=True))
    assert expiry == [Decimal("-75")]
    due.refresh_from_db()
    assert (due.status, due.remaining) == (CreditGrant.Status.EXPIRED, Decimal("0"))
    assert_ledger_consistent(wallet)
    assert wallet.ledger_balance == Decimal("25")
    runs = list(JobRun.objects.filter(name="grants_expire_due").order_by("started_at").values_list("status", "detail"))
    assert sum(detail["expired"] for _, detail in runs) == 1
    assert all(status == "succeeded" for status, _ in runs)
    assert "billing.tasks.grants_expire_due" in worker_log.read_text()
