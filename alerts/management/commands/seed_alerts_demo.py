"""Set up alerts for the demo customers of ``seed_demo`` (run right after it by
``scripts/creditdesk prepare``).

- A global alert rule, "Demo balance alerts": 50 % (info), 20 % (warning),
  10 % (critical) of the credits granted in the last 30 days, 0 credits
  (critical), and "≤ 7 days until depletion" (info); email, SMS and webhooks,
  to the billing and technical contacts and the account owner.
- Contacts for Pixel Forge, Nova Labs and Acme (billing and technical emails; a
  phone for Pixel Forge's technical contact, so the console SMS shows too) with
  the demo sales staff as account owners.
- A signed webhook endpoint for every event type, pointing at the demo receiver
  inside Creditdesk (``/alerts/demo-receiver/<id>`` under ``--url``).
- Auto top-up on Pixel Forge's wallet: at or below 5,000 credits, buy one
  Starter 10K pack; one-hour cooldown, at most 3 top-ups and 30,000 credits a month.
- The demo ``finance`` user in the Finance group with an email, so staff notices
  (cap reached, approvals, disabled endpoints) reach someone.

Then every demo wallet is evaluated once, so billing watches its thresholds at
once (a balance already under one notifies now, as the sweep would).

Idempotent: what exists is left as it is (also settings changed in the admin
since); a second run changes nothing.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from alerts.models import (
    WEBHOOK_EVENT_TYPES,
    AlertLevel,
    AlertRule,
    AlertsProfile,
    AutoTopUp,
    WebhookEndpoint,
)
from alerts.services.auto_top_up import auto_top_up_set
from alerts.services.evaluation import wallet_refresh
from billing import roles
from billing.management.commands.seed_demo import DEMO_CUSTOMERS
from billing.models import CreditPack, Customer, Wallet
from billing.services.grants import default_wallet

RULE_NAME = "Demo balance alerts"
LEVELS = (
    # kind, value, severity
    (AlertLevel.Kind.PERCENT, "50", "info"),
    (AlertLevel.Kind.PERCENT, "20", "warning"),
    (AlertLevel.Kind.PERCENT, "10", "critical"),
    (AlertLevel.Kind.ABSOLUTE, "0", "critical"),
    (AlertLevel.Kind.DAYS_LEFT, "7", "info"),
)
CONTACTS = {
    # customer: billing email, technical email, technical phone, account owner (a seed_demo staff user)
    "pixelforge": ("billing@pixelforge.example", "dev@pixelforge.example", "+15555550123", "sales"),
    "novalabs": ("hello@novalabs.example", "eng@novalabs.example", "", "sales"),
    "acme": ("ap@acme.example", "platform@acme.example", "", "salesmanager"),
}
ENDPOINT_DESCRIPTION = "Demo receiver (seed_alerts_demo): verifies the signature, answers 204"
RECEIVER_PATH = "/alerts/demo-receiver/{pk}"
TOP_UP_CUSTOMER = "pixelforge"
TOP_UP = {
    "threshold": Decimal("5000"), "pack_code": "starter-10k", "pack_quantity": 1, "cooldown": timedelta(hours=1),
    "monthly_max_count": 3, "monthly_max_credits": Decimal("30000"), "max_consecutive_failures": 3,
}
FINANCE_USERNAME = "finance"


class Command(BaseCommand):
    help = "Set up the alerts demo on top of seed_demo's customers (idempotent)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:8000",
                            help="Where the web server listens (the demo webhook endpoint points there).")

    def handle(self, *args, **options) -> None:
        customers = {c.external_id: c for c in Customer.objects.filter(external_id__in=DEMO_CUSTOMERS)}
        if set(customers) != set(DEMO_CUSTOMERS):
            raise CommandError("Load the demo data first: python manage.py seed_demo")
        self.changed: list[str] = []
        with transaction.atomic():
            self.finance_user()
            self.rule()
            self.contacts(customers)
            endpoint = self.endpoint(options["url"].rstrip("/"))
            self.auto_top_up(customers[TOP_UP_CUSTOMER])
        # Separate transactions: notices for a balance already under a level go out as each commits.
        for customer in customers.values():
            for wallet_id in Wallet.objects.filter(customer=customer).values_list("pk", flat=True):
                wallet_refresh(wallet_id=wallet_id, cause="settings")
        if self.changed:
            self.stdout.write(f"Alerts demo set up: {', '.join(self.changed)}.")
        else:
            self.stdout.write("Alerts demo already set up; nothing to do.")
        self.stdout.write(f"Demo webhook endpoint: {endpoint.url}")

    def finance_user(self) -> None:
        roles.ensure_roles()
        user, created = get_user_model().objects.get_or_create(
            username=FINANCE_USERNAME, defaults={"is_staff": True, "email": f"{FINANCE_USERNAME}@creditdesk.local"})
        if created:
            user.set_unusable_password()  # ensure_demo_admin sets the demo password
            user.save(update_fields=["password"])
            self.changed.append("finance user")
        elif not user.email:
            user.email = f"{FINANCE_USERNAME}@creditdesk.local"
            user.save(update_fields=["email"])
            self.changed.append("finance email")
        finance = Group.objects.get(name=roles.FINANCE)
        if not user.groups.filter(pk=finance.pk).exists():
            user.groups.add(finance)
            self.changed.append("finance group")

    def rule(self) -> None:
        rule, created = AlertRule.objects.get_or_create(
            name=RULE_NAME, scope=AlertRule.Scope.GLOBAL,
            defaults={"period_days": 30, "email": True, "sms": True, "webhook": True,
                      "notify_billing_contact": True, "notify_technical_contact": True,
                      "notify_account_owner": True, "notify_finance": False},
        )
        if created:
            self.changed.append("global alert rule")
            for kind, value, severity in LEVELS:
                AlertLevel.objects.create(rule=rule, kind=kind, value=Decimal(value), severity=severity)

    def contacts(self, customers: dict[str, Customer]) -> None:
        staff = get_user_model().objects.in_bulk([owner for *_, owner in CONTACTS.values()], field_name="username")
        for external_id, (billing_email, technical_email, technical_phone, owner) in CONTACTS.items():
            _, created = AlertsProfile.objects.get_or_create(customer=customers[external_id], defaults={
                "billing_email": billing_email, "technical_email": technical_email,
                "technical_phone": technical_phone, "account_owner": staff.get(owner)})
            if created:
                self.changed.append(f"{external_id} contacts")

    def endpoint(self, base_url: str) -> WebhookEndpoint:
        endpoint = WebhookEndpoint.objects.filter(description=ENDPOINT_DESCRIPTION, customer__isnull=True).first()
        if endpoint is None:
            endpoint = WebhookEndpoint.objects.create(description=ENDPOINT_DESCRIPTION, url=base_url,
                                                      event_types=list(WEBHOOK_EVENT_TYPES))
            self.changed.append("demo webhook endpoint")
        url = base_url + RECEIVER_PATH.format(pk=endpoint.pk)
        if endpoint.url != url:  # new, or the server now listens elsewhere (--url)
            endpoint.url = url
            endpoint.save(update_fields=["url"])
        return endpoint

    def auto_top_up(self, customer: Customer) -> None:
        wallet = default_wallet(customer)
        if AutoTopUp.objects.filter(wallet=wallet).exists():
            return
        settings = dict(TOP_UP)
        pack = CreditPack.objects.get(code=settings.pop("pack_code"))
        auto_top_up_set(wallet=wallet, pack=pack, mode=AutoTopUp.Mode.PACK, enabled=True, **settings)
        self.changed.append(f"auto top-up for {customer.external_id}")
