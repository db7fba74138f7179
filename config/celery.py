"""The Celery app. Beat schedules live in code (config/schedule.py) and are
copied into django-celery-beat's tables, where staff can see and pause them."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("creditdesk")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
