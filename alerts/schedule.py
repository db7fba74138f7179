"""The alerts app's clock-driven job, for the lead to wire into config/schedule.py.

``SCHEDULE`` has the shape of Celery's ``beat_schedule`` entries; ``JOBS`` the
same job as ``config.schedule.ScheduledJob`` rows.
"""

from __future__ import annotations

from datetime import timedelta

SWEEP_EVERY = timedelta(minutes=5)

SCHEDULE = {
    "alerts-sweep": {
        "task": "alerts.tasks.alerts_sweep",
        "schedule": SWEEP_EVERY,
        "options": {"expires": SWEEP_EVERY.total_seconds()},
    },
}


def jobs():
    from config.schedule import ScheduledJob

    return (
        ScheduledJob(
            name="Alerts sweep",
            task="alerts.tasks.alerts_sweep",
            every=SWEEP_EVERY,
            description="Re-evaluates balance alerts and days-left rules, sends expiring-soon notices, "
                        "retries missed deliveries and auto top-ups.",
            expires_after=SWEEP_EVERY,
        ),
    )
