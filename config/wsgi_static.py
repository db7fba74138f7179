"""The WSGI app for the one-command local run (``make run``): Django plus its
static files (admin CSS, API docs assets), served by Django's staticfiles
handler straight from the apps, so no ``collectstatic`` and no web server in
front are needed. Behind a real web server use ``config.wsgi`` and
``collectstatic`` instead."""

import os

from django.contrib.staticfiles.handlers import StaticFilesHandler
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = StaticFilesHandler(get_wsgi_application())
