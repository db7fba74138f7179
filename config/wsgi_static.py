"""The WSGI app for the one-command local run (``make run``): ``config.wsgi`` (Django
with the hot API routes) plus its static files (admin CSS, API docs assets),
served by Django's staticfiles handler straight from the apps, so no
``collectstatic`` and no web server in front are needed. Behind a real web
server use ``config.wsgi`` and ``collectstatic`` instead."""

import os

from django.contrib.staticfiles.handlers import StaticFilesHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from config.wsgi import application as api_application  # noqa: E402 - after the settings module is named

application = StaticFilesHandler(api_application)
# For config.gunicorn_worker: the hot API requests it may serve inline (never a static file).
application.is_quick = api_application.is_quick
