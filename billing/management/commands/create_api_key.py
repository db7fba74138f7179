"""``python manage.py create_api_key <name> [--scopes usage:write balance:read admin]``.

Prints the new key on its last line. It is shown once: only its hash is stored.
"""

from django.core.management.base import BaseCommand, CommandError

from billing.errors import BillingError
from billing.services.api_keys import ALL_SCOPES, api_key_create

DEFAULT_SCOPES = ["usage:write", "balance:read"]


class Command(BaseCommand):
    help = "Create an API key and print it (once) on the last line."

    def add_arguments(self, parser):
        parser.add_argument("name", help="What the key is for, e.g. 'product backend'.")
        parser.add_argument(
            "--scopes", nargs="+", default=DEFAULT_SCOPES, choices=ALL_SCOPES, metavar="SCOPE",
            help=f"Any of {', '.join(ALL_SCOPES)} (default: {' '.join(DEFAULT_SCOPES)}); admin may do everything.",
        )

    def handle(self, *args, name: str, scopes: list[str], **options):
        try:
            api_key, raw_key = api_key_create(name=name, scopes=scopes)
        except BillingError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"API key #{api_key.pk} '{api_key.name}' with scopes {', '.join(api_key.scopes)}. "
                          "Store it now: it is not shown again.")
        self.stdout.write(raw_key)
