"""Progress of long and clock-driven jobs, recorded as ``JobRun`` rows so staff
can watch them in the admin (DESIGN.md §7).

``job_run(name)`` opens a run, hands the job a ``JobProgress`` to report
``total`` and ``done``, and closes the run as ``succeeded`` or ``failed``. Each
write is its own short statement outside the job's transactions, so progress is
visible while the job works and survives a rollback of the job's own work. A
run whose process was killed keeps status ``running`` with the last progress it
reported until the next run of any job starts: each live run holds a
session-level PostgreSQL advisory lock keyed by its id, which the server drops
with the dead process's connection, so a ``running`` row whose lock is free is
marked ``interrupted`` (the job itself is idempotent: the next run finishes
its work).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection, transaction
from django.utils import timezone

from billing.models import JobRun

# Live job runs hold one-key (bigint) advisory locks JOB_LOCK_SPACE·2³² + run id;
# every other advisory lock in Creditdesk uses the separate two-key space.
JOB_LOCK_SPACE = 0x4A4F42
# Runs open in this process: advisory locks are re-entrant for the session that
# holds them, so our own connection would otherwise see its live runs as dead.
_live_runs: set[int] = set()


class JobProgress:
    """Counts work done; writes to the database at most every ``every_seconds``."""

    def __init__(self, run: JobRun, every_seconds: float = 2.0) -> None:
        self.run = run
        self.every_seconds = every_seconds
        self._written_at = time.monotonic()

    def set_total(self, total: int) -> None:
        self.run.total = total
        JobRun.objects.filter(pk=self.run.pk).update(total=total)

    def advance(self, count: int = 1) -> None:
        self.run.done += count
        if time.monotonic() - self._written_at >= self.every_seconds:
            self._written_at = time.monotonic()
            JobRun.objects.filter(pk=self.run.pk).update(done=self.run.done, total=max(self.run.total, self.run.done))

    def note(self, **detail) -> None:
        self.run.detail.update(detail)


@contextmanager
def job_run(name: str) -> Iterator[JobProgress]:
    """Record one run of the job ``name``; re-raises whatever the job raises after marking the run failed."""
    with transaction.atomic():
        # Others see the row only once it commits, and by then its lock is held.
        run = JobRun.objects.create(name=name, started_at=timezone.now(), status="running")
        _advisory("pg_advisory_lock", run.pk)
    with run_alive(run.pk, locked=True):
        runs_mark_interrupted()
        progress = JobProgress(run)
        try:
            yield progress
        except BaseException as exc:
            run.detail["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            _finish(run, "failed")
            raise
        _finish(run, "succeeded")


@contextmanager
def run_alive(run_id: int, *, locked: bool = False) -> Iterator[None]:
    """Hold run ``run_id``'s liveness lock while the block runs, so no other
    process marks it interrupted; for jobs that manage their JobRun row
    themselves (the bulk promotional grant)."""
    if not locked:
        _advisory("pg_advisory_lock", run_id)
    _live_runs.add(run_id)
    try:
        yield
    finally:
        _live_runs.discard(run_id)
        _advisory("pg_advisory_unlock", run_id)


def runs_mark_interrupted() -> int:
    """Mark ``interrupted`` every ``running`` job run whose process is gone
    (its advisory lock is free). A run still alive in another process keeps
    its lock and is left alone. Returns how many runs were marked."""
    marked = 0
    for run_id in JobRun.objects.filter(status="running").exclude(pk__in=_live_runs).values_list("pk", flat=True):
        if not _advisory("pg_try_advisory_lock", run_id):
            continue
        try:
            marked += JobRun.objects.filter(pk=run_id, status="running").update(
                status="interrupted", finished_at=timezone.now())
        finally:
            _advisory("pg_advisory_unlock", run_id)
    return marked


def _advisory(function: str, run_id: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {function}(%s::bigint)", [(JOB_LOCK_SPACE << 32) + run_id])
        return cursor.fetchone()[0] is not False


def _finish(run: JobRun, status: str) -> None:
    run.status = status
    run.finished_at = timezone.now()
    run.total = max(run.total, run.done)
    JobRun.objects.filter(pk=run.pk).update(
        status=status, finished_at=run.finished_at, total=run.total, done=run.done, detail=run.detail
    )
