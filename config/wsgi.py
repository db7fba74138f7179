import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_wsgi_application()

from billing.api.fast import HotRoutesApplication  # noqa: E402 - needs the apps loaded

# The hot API routes' ordinary requests skip URL resolving and the middleware chain (billing/api/fast.py).
application = HotRoutesApplication(django_application)
