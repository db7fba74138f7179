"""Progress of long and clock-driven jobs, recorded as ``JobRun`` rows so staff
can watch them in the admin (DESIGN.md §7).

``job_run(name)`` opens a run, hands the job a ``JobProgress`` to report
``total`` and ``done``, and closes the run as ``succeeded`` or ``failed``. Each
write is its own short statement outside the job's transactions, so progress is
visible while the job works and survives a rollback of the job's own work. A
run whose process was killed keeps status ``running`` with the last progress it
reported; the job itself is idempotent, so the next run simply finishes it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from django.utils import timezone

from billing.models import JobRun


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
    run = JobRun.objects.create(name=name, started_at=timezone.now(), status="running")
    progress = JobProgress(run)
    try:
        yield progress
    except BaseException as exc:
        run.detail["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        _finish(run, "failed")
        raise
    _finish(run, "succeeded")


def _finish(run: JobRun, status: str) -> None:
    run.status = status
    run.finished_at = timezone.now()
    run.total = max(run.total, run.done)
    JobRun.objects.filter(pk=run.pk).update(
        status=status, finished_at=run.finished_at, total=run.total, done=run.done, detail=run.detail
    )
