"""Copy the beat schedule declared in ``config/schedule.py`` into django-celery-beat's tables.

Idempotent: a second run changes nothing. A job a staff member paused in the
admin stays paused; every other field follows the code. Jobs that were declared
in code once and are gone from it now are deleted.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from config.schedule import SCHEDULE, ScheduledJob

# Marks the rows this command owns, so jobs staff added by hand are never touched.
MARKER = "[config/schedule.py] "


def _interval(job: ScheduledJob) -> IntervalSchedule:
    seconds = int(job.every.total_seconds())
    if seconds % 60 == 0:
        every, period = seconds // 60, IntervalSchedule.MINUTES
    else:
        every, period = seconds, IntervalSchedule.SECONDS
    interval, _ = IntervalSchedule.objects.get_or_create(every=every, period=period)
    return interval


class Command(BaseCommand):
    help = "Load the beat schedule declared in config/schedule.py into the database scheduler."

    def handle(self, *args, **options) -> None:
        created = updated = unchanged = 0
        with transaction.atomic():
            for job in SCHEDULE:
                wanted = {
                    "task": job.task,
                    "interval": _interval(job),
                    "crontab": None,
                    "description": MARKER + job.description,
                    "expire_seconds": int(job.expires_after.total_seconds()) if job.expires_after else None,
                    "one_off": False,
                }
                task = PeriodicTask.objects.filter(name=job.name).first()
                if task is None:
                    PeriodicTask.objects.create(name=job.name, enabled=True, **wanted)
                    created += 1
                    continue
                changed = [field for field, value in wanted.items() if getattr(task, field) != value]
                if not changed:
                    unchanged += 1
                    continue
                for field in changed:
                    setattr(task, field, wanted[field])
                task.save()  # keeps ``enabled`` as staff left it
                updated += 1
            stale = PeriodicTask.objects.filter(description__startswith=MARKER).exclude(
                name__in=[job.name for job in SCHEDULE]
            )
            removed = stale.count()
            stale.delete()
        self.stdout.write(
            f"Beat schedule synced at {timezone.now():%H:%M:%S}: {created} created, {updated} updated, "
            f"{unchanged} unchanged, {removed} removed."
        )
