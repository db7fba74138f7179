"""Create or refresh the demo logins and print them.

An ``admin`` superuser and one staff user per role (see ``seed_demo.DEMO_STAFF``),
all with the demo password (``CREDITDESK_DEMO_PASSWORD``, default
``creditdesk-demo``). Run at every start of the demo, so a forgotten or changed
password is reset to the documented one. For a laptop demo only.
"""

from __future__ import annotations

import os

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand

from billing.management.commands.seed_demo import DEMO_STAFF
from billing.roles import ensure_roles

DEFAULT_PASSWORD = "creditdesk-demo"
ADMIN_USERNAME = "admin"


class Command(BaseCommand):
    help = "Create or refresh the demo admin and role users, and print how to log in."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="Where the web server listens.")

    def handle(self, *args, **options) -> None:
        password = os.environ.get("CREDITDESK_DEMO_PASSWORD") or DEFAULT_PASSWORD
        ensure_roles()
        user_model = get_user_model()
        admin, _ = user_model.objects.get_or_create(username=ADMIN_USERNAME)
        admin.email = admin.email or "admin@creditdesk.local"
        admin.is_staff = admin.is_superuser = admin.is_active = True
        admin.set_password(password)
        admin.save()
        for username, role in DEMO_STAFF.items():
            user, _ = user_model.objects.get_or_create(username=username)
            user.email = user.email or f"{username}@creditdesk.local"
            user.is_staff = user.is_active = True
            user.set_password(password)
            user.save()
            user.groups.add(Group.objects.get(name=role))
        url = options["url"].rstrip("/")
        self.stdout.write(self.style.SUCCESS(f"Admin:    {url}/admin/"))
        self.stdout.write(self.style.SUCCESS(f"Login:    {ADMIN_USERNAME} / {password}"))
        roles = ", ".join(f"{username} ({role})" for username, role in DEMO_STAFF.items())
        self.stdout.write(f"Role users, same password: {roles}")
