"""Load the demo story: a rate card, a pack catalog, three customers and ~60 days of history.

Everything is written through the real services, so the ledger is exactly what
production would hold. History is replayed with the clock the services read
(``django.utils.timezone.now``) set to each moment of the story, so ledger
entries, usage events, grants and audit rows carry the dates they would have had.

The story (see README.md, "What you see"):

- **Pixel Forge** (``pixelforge``), a startup on a ``block`` wallet: bought a
  Growth pack on day one, got a transcription-only webinar promo that partly
  expired, a goodwill adjustment after an outage, ran dry (a few events were
  refused), then bought three Starter packs at the volume discount.
- **Nova Labs** (``novalabs``), a trial signup on the promotional Trial pack,
  which expires in three days.
- **Orbit Analytics** (``orbit``, New York time), on the hybrid Team plan since
  day one: 30,000 included credits a month, overage billed; its first period is
  closed and its invoice paid; it moved up to Scale mid-period, so the running
  period's invoice will carry the proration.
- **Acme Corp** (``acme``), an enterprise on an annual contract (upfront,
  quarterly true-ups; its first true-up date has passed, ready to run) with one
  pooled ``overdraft`` wallet
  shared by the research, product and support teams (``properties.team``), a
  negotiated gpt-tokens price, a captured hold, an open hold for a fine-tuning
  run, overage after its contract credits ran out and a top-up grant waiting for
  approval.

Idempotent: once the demo customers exist, a second run changes nothing. The
whole story is one transaction, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from unittest import mock

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models.signals import pre_save
from django.utils import timezone as django_timezone

from billing import roles, tasks
from billing.models import (
    ApiKey,
    Contract,
    CreditGrant,
    CreditPack,
    Customer,
    Feature,
    Invoice,
    OutboxEvent,
    PackDiscountTier,
    Plan,
    Subscription,
    Wallet,
)
from billing.services.api_keys import hash_key
from billing.services.contracts import contract_activate, contract_create
from billing.services.features import feature_cost_create, feature_create
from billing.services.grants import (
    adjustment_approve,
    adjustment_request,
    customer_create,
    default_wallet,
    grant_create,
)
from billing.services.invoices import payment_record
from billing.services.packs import pack_purchase
from billing.services.plans import add_months, subscription_change_plan, subscription_start
from billing.services.refunds import refund_approve, refund_request
from billing.services.reservations import reservation_capture, reservation_create
from billing.services.team_limits import team_limit_set
from billing.services.usage import ChargeRequest, usage_charge_many

DEMO_CUSTOMERS = ("pixelforge", "novalabs", "acme")
HISTORY_DAYS = 60
# Known only in the demo: lets README's curl examples work. Revoke it anywhere real.
DEMO_API_KEY = "cdk_demo_creditdesk-demo-key-not-secret"
DEMO_API_KEY_PREFIX = "demo"
SEED_LABEL = "seed_demo"

# Staff users, one per role; ``ensure_demo_admin`` sets their passwords.
DEMO_STAFF = {
    "finance": roles.FINANCE,
    "sales": roles.SALES_REP,
    "salesmanager": roles.SALES_MANAGER,
    "support": roles.SUPPORT,
    "auditor": roles.AUDITOR,
}

FEATURES = (
    # key, name, unit, credits per unit
    ("gpt-tokens", "GPT tokens", "1K tokens", "2"),
    ("image-generation", "Image generation", "image", "40"),
    ("api-call", "API call", "request", "1"),
    ("transcription-minute", "Transcription", "minute", "6"),
)

PACKS = (
    # code, name, kind, credits, price, validity days, priority, tiers (min quantity, % off)
    ("starter-10k", "Starter 10K", CreditPack.Kind.PREPAID, "10000", "100.00", 365, 50, ((3, "5"), (10, "10"))),
    ("growth-50k", "Growth 50K", CreditPack.Kind.PREPAID, "50000", "450.00", 365, 50, ((3, "5"), (10, "12"))),
    ("scale-250k", "Scale 250K", CreditPack.Kind.PREPAID, "250000", "2000.00", 365, 50, ((2, "5"), (5, "10"))),
    ("trial-500", "Trial 500", CreditPack.Kind.PROMOTIONAL, "500", "0", 30, 40, ()),
)


@dataclass(frozen=True)
class UsageMix:
    """One kind of usage of one customer: how many events a day and how big each is."""

    feature: str
    per_day: tuple[int, int]
    quantity: tuple[int, int]
    team: str | None = None


MIXES = {
    "pixelforge": (
        UsageMix("gpt-tokens", (8, 12), (20, 60)),
        UsageMix("image-generation", (1, 4), (1, 3)),
        UsageMix("api-call", (5, 10), (10, 40)),
        UsageMix("transcription-minute", (0, 1), (2, 8)),
    ),
    "novalabs": (
        UsageMix("gpt-tokens", (0, 2), (1, 5)),
        UsageMix("api-call", (1, 4), (1, 4)),
    ),
    "acme": (
        UsageMix("gpt-tokens", (10, 16), (50, 250), team="research"),
        UsageMix("image-generation", (5, 15), (1, 4), team="product"),
        UsageMix("api-call", (10, 20), (10, 80), team="product"),
        UsageMix("transcription-minute", (3, 8), (5, 40), team="support"),
        UsageMix("gpt-tokens", (3, 6), (5, 30), team="support"),
    ),
}


# Credits per calendar month each of acme's teams may spend from the pooled wallet.
ACME_TEAM_LIMITS = {"research": "150000", "product": "60000", "support": "20000"}


class DemoClock:
    """The clock the services read while the story is replayed.

    Inside ``running()``, ``django.utils.timezone.now`` returns ``self.at``, and
    rows saved one by one get ``created_at = self.at`` (model defaults were bound
    to the real clock at import time)."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def _stamp(self, sender, instance, raw=False, **kwargs) -> None:
        if instance._state.adding and not raw and any(f.name == "created_at" for f in sender._meta.concrete_fields):
            instance.created_at = self.at

    @contextmanager
    def running(self) -> Iterator[DemoClock]:
        pre_save.connect(self._stamp, weak=False, dispatch_uid="seed_demo_clock")
        try:
            with mock.patch.object(django_timezone, "now", self):
                yield self
        finally:
            pre_save.disconnect(dispatch_uid="seed_demo_clock")


class Story:
    def __init__(self, *, today: datetime) -> None:
        self.today = today
        self.start = (today - timedelta(days=HISTORY_DAYS)).replace(hour=0, minute=0, second=0, microsecond=0)
        self.clock = DemoClock(self.start)
        self.random = random.Random(20260101)
        self.features: dict[str, Feature] = {}
        self.customers: dict[str, Customer] = {}
        self.wallets: dict[str, Wallet] = {}
        self.packs: dict[str, CreditPack] = {}
        self.staff = {}
        self.pixelforge_topped_up = False
        self.counts = {"charged": 0, "rejected": 0}

    def day(self, number: int, hour: int = 0, minute: int = 0) -> datetime:
        return self.start + timedelta(days=number, hours=hour, minutes=minute)

    def at(self, moment: datetime) -> None:
        self.clock.at = moment

    # --- Setting the scene ------------------------------------------------
    def users(self) -> None:
        user_model = get_user_model()
        for username, role in DEMO_STAFF.items():
            user, created = user_model.objects.get_or_create(
                username=username, defaults={"is_staff": True, "email": f"{username}@creditdesk.local"}
            )
            if created:
                user.set_unusable_password()
                user.save(update_fields=["password"])
            user.groups.add(Group.objects.get(name=role))
            self.staff[username] = user

    def catalog(self) -> None:
        self.at(self.start - timedelta(days=1))
        for key, name, unit, credits in FEATURES:
            self.features[key] = feature_create(
                key=key, name=name, unit=unit, credits_per_unit=Decimal(credits),
                effective_from=self.clock.at, actor=self.staff["finance"],
            )
        for code, name, kind, credits, price, validity, priority, tiers in PACKS:
            pack, _ = CreditPack.objects.get_or_create(
                code=code,
                defaults={"name": name, "kind": kind, "credits": Decimal(credits), "price": Decimal(price),
                          "validity_days": validity, "priority": priority},
            )
            for min_quantity, percent in tiers:
                PackDiscountTier.objects.get_or_create(
                    pack=pack, min_quantity=min_quantity, defaults={"discount_percent": Decimal(percent)}
                )
            self.packs[code] = pack

    def signup(self, external_id: str, name: str, email: str, **wallet) -> None:
        self.customers[external_id] = customer_create(
            external_id=external_id, name=name, email=email, actor=self.staff["sales"], **wallet
        )
        self.wallets[external_id] = default_wallet(self.customers[external_id])

    # --- The timeline -----------------------------------------------------
    def moments(self, number: int) -> list[tuple[datetime, Callable[[], None]]]:
        """Story beats of one day (usage comes on top, hour by hour)."""
        beats: dict[int, list[tuple[datetime, Callable[[], None]]]] = {
            0: [
                (self.day(0, 6), self.acme_signs_contract),
                (self.day(0, 7), self.pixelforge_signs_up),
            ],
            1: [(self.day(1, 7, 15), self.orbit_subscribes)],
            10: [(self.day(10, 9), self.pixelforge_webinar_promo)],
            20: [(self.day(20, 11), self.pixelforge_goodwill)],
            25: [(self.day(25, 10), self.pixelforge_refund_double_checkout)],
            30: [(self.day(30, 15), self.pixelforge_abandoned_hold)],
            37: [(self.day(37, 14), self.orbit_pays_first_invoice)],
            46: [(self.day(46, 16), self.orbit_upgrades)],
            HISTORY_DAYS - 27: [(self.day(HISTORY_DAYS - 27, 7, 30), self.novalabs_starts_trial)],
            HISTORY_DAYS - 25: [(self.day(HISTORY_DAYS - 25, 9), self.rebalance_gpt_tokens)],
            HISTORY_DAYS - 10: [
                (self.day(HISTORY_DAYS - 10, 9), self.rebalance_images),
                (self.day(HISTORY_DAYS - 10, 12), self.acme_transcription_batch),
            ],
            HISTORY_DAYS - 2: [(self.day(HISTORY_DAYS - 2, 10), self.acme_requests_top_up)],
        }
        return beats.get(number, [])

    def acme_signs_contract(self) -> None:
        """Acme goes live on an annual contract whose term began a quarter ago
        (signed before it moved onto Creditdesk): 250,000 credits a year paid
        upfront at the 250K tier less 5 %, pooled for all teams, overdraft up to
        100,000 credits, quarterly true-ups at 0.009 per credit. Its first
        true-up date passed a day or two ago: finance runs it from the contract
        page ("Run true-up now"), or the beat job settles it."""
        self.signup("acme", "Acme Corp", "ap@acme.example")
        quarter_ago = add_months(self.today.date(), -3) - timedelta(days=1)
        contract = contract_create(
            customer=self.customers["acme"], wallet=self.wallets["acme"], reference="ACME-ANNUAL",
            starts_at=datetime.combine(quarter_ago, time.min, tzinfo=UTC), term_months=12,
            committed_credits=Decimal("250000"), list_price=Decimal("0.008"),
            tiers=[(Decimal("100000"), Decimal("0.0078")), (Decimal("250000"), Decimal("0.0074"))],
            discount_percent=Decimal("5"), payment_schedule=Contract.PaymentSchedule.UPFRONT,
            true_up_cadence=Contract.Cadence.QUARTERLY, true_up_price=Decimal("0.009"),
            rollover_percent=Decimal("20"), credit_limit=Decimal("100000"), actor=self.staff["sales"],
        )
        contract_activate(contract_id=contract.pk, actor=self.staff["finance"])
        feature_cost_create(
            feature=self.features["gpt-tokens"], customer=self.customers["acme"], credits_per_unit=Decimal("1.2"),
            note="Negotiated in the annual contract", actor=self.staff["finance"],
        )

    def pixelforge_signs_up(self) -> None:
        self.signup("pixelforge", "Pixel Forge", "founders@pixelforge.example")
        wallet = self.wallets["pixelforge"]
        pack_purchase(wallet=wallet, pack=self.packs["trial-500"], actor_label="self-serve signup",
                      idempotency_key="demo-pixelforge-trial")
        pack_purchase(wallet=wallet, pack=self.packs["growth-50k"], actor_label="self-serve checkout",
                      idempotency_key="demo-pixelforge-growth")

    def pixelforge_webinar_promo(self) -> None:
        grant_create(
            wallet=self.wallets["pixelforge"], kind=CreditGrant.Kind.PROMOTIONAL,
            source=CreditGrant.Source.PROMOTION, amount=Decimal("1000"), feature=self.features["transcription-minute"],
            expires_at=self.day(40), reason="Webinar promo: try transcription for 30 days",
            requested_by=self.staff["finance"], idempotency_key="demo-pixelforge-webinar",
        )

    def pixelforge_goodwill(self) -> None:
        adjustment = adjustment_request(
            wallet=self.wallets["pixelforge"], amount=Decimal("500"),
            reason="Goodwill credit: image generation was down for two hours", requested_by=self.staff["support"],
        )
        self.at(self.clock.at + timedelta(hours=2))
        adjustment_approve(adjustment_id=adjustment.pk, user=self.staff["finance"])

    def pixelforge_abandoned_hold(self) -> None:
        reservation_create(customer=self.customers["pixelforge"], wallet_id=self.wallets["pixelforge"].pk,
                           amount=Decimal("800"), ttl_seconds=3600, idempotency_key="demo-pixelforge-render")

    def orbit_subscribes(self) -> None:
        """Orbit signs up on the hybrid Team plan (its periods run in New York time)."""
        self.signup("orbit", "Orbit Analytics", "billing@orbit.example", timezone_name="America/New_York")
        team = self.plan("team-monthly", "Team", "199.00", "30000", "0.0100", "15000", rollover_percent="10")
        self.plan("scale-monthly", "Scale", "499.00", "80000", "0.0080", "40000")
        subscription_start(customer=self.customers["orbit"], plan=team, actor=self.staff["finance"])

    def plan(self, code: str, name: str, fee: str, included: str, overage_price: str, cap: str, **extra) -> Plan:
        plan, _ = Plan.objects.get_or_create(code=code, defaults={
            "name": name, "base_fee": Decimal(fee), "included_credits": Decimal(included),
            "overage_policy": Plan.OveragePolicy.OVERDRAFT, "overage_price": Decimal(overage_price),
            "overage_cap": Decimal(cap), **{key: Decimal(value) for key, value in extra.items()}})
        return plan

    def orbit_pays_first_invoice(self) -> None:
        invoice = Invoice.objects.filter(customer=self.customers["orbit"], status=Invoice.Status.ISSUED).first()
        if invoice is not None:
            payment_record(invoice_id=invoice.pk, amount=invoice.amount_due, reference="Wire ORB-0001",
                           actor=self.staff["finance"])

    def orbit_usage(self, number: int) -> None:
        """Orbit reports each day's usage in one batch at 17:30 (deterministic, so
        the other customers' random usage stays as it was)."""
        if "orbit" not in self.customers:
            return
        self.at(self.day(number, 17, 31))
        usage_charge_many([
            ChargeRequest(customer=self.customers["orbit"], wallet_id=self.wallets["orbit"].pk,
                          feature=self.features[feature], quantity=Decimal(quantity),
                          event_id=f"demo-orbit-d{number:02d}-{feature}", occurred_at=self.day(number, 17, 30))
            for feature, quantity in (("gpt-tokens", 450 + number * 37 % 200), ("api-call", 60 + number * 13 % 50))
        ])

    def orbit_upgrades(self) -> None:
        subscription = Subscription.objects.get(customer=self.customers["orbit"])
        subscription_change_plan(subscription_id=subscription.pk, plan=Plan.objects.get(code="scale-monthly"),
                                 actor=self.staff["finance"])

    def pixelforge_refund_double_checkout(self) -> None:
        """A double click bought a second Growth 50K: support asks for its unused
        credits back and finance (a second person) refunds them with a credit note."""
        purchase = pack_purchase(wallet=self.wallets["pixelforge"], pack=self.packs["growth-50k"],
                                 actor_label="self-serve checkout", idempotency_key="demo-pixelforge-double-click")
        refund = refund_request(grant_id=purchase.grant_id, credits=None, requested_by=self.staff["support"],
                                reason="Bought twice by a double click at checkout; none of it used")
        refund_approve(refund_id=refund.pk, user=self.staff["finance"])

    def pixelforge_buys_top_up(self) -> None:
        self.at(self.clock.at + timedelta(minutes=40))
        pack_purchase(wallet=self.wallets["pixelforge"], pack=self.packs["starter-10k"], quantity=3,
                      actor_label="self-serve checkout", idempotency_key="demo-pixelforge-top-up")
        self.pixelforge_topped_up = True

    def novalabs_starts_trial(self) -> None:
        self.signup("novalabs", "Nova Labs", "hello@novalabs.example")
        pack_purchase(wallet=self.wallets["novalabs"], pack=self.packs["trial-500"], actor_label="self-serve signup",
                      idempotency_key="demo-novalabs-trial")

    def rebalance_gpt_tokens(self) -> None:
        feature_cost_create(feature=self.features["gpt-tokens"], credits_per_unit=Decimal("1.5"),
                            note="Rebalanced: moved to a cheaper model", actor=self.staff["finance"])

    def rebalance_images(self) -> None:
        feature_cost_create(feature=self.features["image-generation"], credits_per_unit=Decimal("50"),
                            note="Rebalanced: GPU prices went up", actor=self.staff["finance"])

    def acme_transcription_batch(self) -> None:
        customer, feature = self.customers["acme"], self.features["transcription-minute"]
        hold = reservation_create(customer=customer, wallet_id=self.wallets["acme"].pk, feature=feature,
                                  quantity=Decimal("500"), ttl_seconds=7200, idempotency_key="demo-acme-batch")
        self.at(self.clock.at + timedelta(minutes=70))
        reservation_capture(reservation=hold, event_id="demo-acme-batch-capture", quantity=Decimal("420"),
                            properties={"team": "support", "job": "call-center backlog"})

    def acme_requests_top_up(self) -> None:
        grant_create(
            wallet=self.wallets["acme"], kind=CreditGrant.Kind.PREPAID, source=CreditGrant.Source.MANUAL,
            amount=Decimal("100000"), price_paid=Decimal("700.00"), expires_at=self.day(HISTORY_DAYS + 365),
            reason="Top-up ahead of renewal: clears the overage (needs a second approver)",
            requested_by=self.staff["finance"], require_approval=True, idempotency_key="demo-acme-top-up",
        )

    # --- Usage --------------------------------------------------------------
    def usage_of_day(self, number: int) -> list[tuple[str, datetime, ChargeRequest]]:
        events = []
        for external_id, mixes in MIXES.items():
            customer = self.customers.get(external_id)
            if customer is None:
                continue
            counter = 0
            for mix in mixes:
                for _ in range(self.random.randint(*mix.per_day)):
                    counter += 1
                    occurred_at = self.day(number, 8, self.random.randrange(0, 10 * 60))
                    properties = {"team": mix.team} if mix.team else {}
                    if mix.feature == "gpt-tokens":
                        properties["model"] = "large" if mix.team == "research" else "small"
                    events.append((external_id, occurred_at, ChargeRequest(
                        customer=customer, wallet_id=self.wallets[external_id].pk,
                        feature=self.features[mix.feature], quantity=Decimal(self.random.randint(*mix.quantity)),
                        event_id=f"demo-{external_id}-d{number:02d}-{counter:03d}", occurred_at=occurred_at,
                        properties=properties,
                    )))
        return [e for e in events if e[1] >= self.customers[e[0]].created_at]

    def charge(self, batch: list[tuple[str, datetime, ChargeRequest]]) -> None:
        """Charge one hour of usage, as the API would have when it arrived."""
        self.at(max(occurred_at for _, occurred_at, _ in batch) + timedelta(seconds=30))
        results = usage_charge_many([request for _, _, request in batch])
        refused = False
        for (external_id, _, _), result in zip(batch, results, strict=True):
            self.counts["charged" if result.status == "charged" else "rejected"] += 1
            refused = refused or (external_id == "pixelforge" and result.status == "rejected")
        if refused and not self.pixelforge_topped_up:
            self.pixelforge_buys_top_up()

    def run_jobs(self, number: int) -> None:
        self.orbit_usage(number)
        self.at(self.day(number, 23, 55))
        tasks.grants_expire_due()
        tasks.reservations_expire_due()
        tasks.subscriptions_close_due()
        tasks.subscriptions_refresh_status()

    def replay(self) -> None:
        with self.clock.running():
            self.catalog()
            for number in range(HISTORY_DAYS):
                beats = self.moments(number)
                for moment, beat in [b for b in beats if b[0].hour < 8]:
                    self.at(moment)
                    beat()
                usage = sorted(self.usage_of_day(number), key=lambda e: e[1])
                later = [b for b in beats if b[0].hour >= 8]
                for hour in range(8, 18):
                    for moment, beat in [b for b in later if b[0].hour == hour]:
                        self.at(moment)
                        beat()
                    batch = [e for e in usage if e[1].hour == hour]
                    if batch:
                        self.charge(batch)
                self.run_jobs(number)
        self.open_hold()
        self.acme_team_limits()
        self.demo_api_key()

    def open_hold(self) -> None:
        reservation_create(customer=self.customers["acme"], wallet_id=self.wallets["acme"].pk,
                           amount=Decimal("5000"), ttl_seconds=6 * 24 * 3600,
                           idempotency_key="demo-acme-fine-tune")

    def acme_team_limits(self) -> None:
        """Per-team monthly spending limits on acme's pooled wallet (shown on its
        wallet page with this month's spend); set today, they count this month's usage."""
        for team, limit in ACME_TEAM_LIMITS.items():
            team_limit_set(wallet_id=self.wallets["acme"].pk, team=team, monthly_limit=Decimal(limit),
                           actor=self.staff["finance"])

    def demo_api_key(self) -> None:
        ApiKey.objects.get_or_create(
            prefix=DEMO_API_KEY_PREFIX,
            defaults={"name": "Demo key (seed_demo)", "hashed_key": hash_key(DEMO_API_KEY),
                      "scopes": [scope for scope in ApiKey.Scope.values]},
        )


class Command(BaseCommand):
    help = "Load the demo customers, catalog and ~60 days of usage history (idempotent)."

    def handle(self, *args, **options) -> None:
        existing = set(Customer.objects.filter(external_id__in=DEMO_CUSTOMERS).values_list("external_id", flat=True))
        if existing == set(DEMO_CUSTOMERS):
            self.stdout.write("Demo data already loaded; nothing to do.")
            return
        if existing:
            raise CommandError(
                f"Some demo customers exist ({', '.join(sorted(existing))}) but not all: this database holds "
                "other data; seed_demo only loads into a database without them."
            )
        started = django_timezone.now()
        with transaction.atomic():
            last_event = OutboxEvent.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
            story = Story(today=started)
            story.users()
            story.replay()
            # The replayed history is 60 days old: nobody should be notified of it
            # now. Its domain events are recorded but marked delivered, so
            # subscribers (alerts, CRM) react only to what happens from here on.
            OutboxEvent.objects.filter(pk__gt=last_event, dispatched_at__isnull=True).update(
                dispatched_at=django_timezone.now()
            )
        seconds = (django_timezone.now() - started).total_seconds()
        self.stdout.write(
            f"Demo data loaded in {seconds:.1f} s: {len(DEMO_CUSTOMERS)} customers, {len(FEATURES)} features, "
            f"{len(PACKS)} packs, {story.counts['charged']} usage events charged and "
            f"{story.counts['rejected']} refused over {HISTORY_DAYS} days."
        )
        self.stdout.write(f"Demo API key (all scopes, demo only): {DEMO_API_KEY}")
