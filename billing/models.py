"""Billing domain models: customers, wallets, grants, the ledger, features and
their credit costs, usage events, reservations, credit packs, API keys.

Models hold fields, constraints and single-row rules. Every write of credit
state goes through ``billing.services``; nothing here moves credits.
"""

from __future__ import annotations

import zoneinfo
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils.timezone import now

from billing.numbers import ZERO


def CreditField(**kwargs) -> models.DecimalField:  # noqa: N802 - reads like a field class
    return models.DecimalField(max_digits=20, decimal_places=6, **kwargs)


def RateField(**kwargs) -> models.DecimalField:  # noqa: N802
    return models.DecimalField(max_digits=20, decimal_places=10, **kwargs)


def MoneyField(**kwargs) -> models.DecimalField:  # noqa: N802
    return models.DecimalField(max_digits=20, decimal_places=4, **kwargs)


def validate_timezone(value: str) -> None:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValidationError(f"Unknown time zone: {value!r}") from None


def validate_currency(value: str) -> None:
    if len(value) != 3 or not value.isalpha() or not value.isupper():
        raise ValidationError("Use a three-letter ISO 4217 code, e.g. USD.")


class Customer(models.Model):
    external_id = models.CharField(max_length=255, unique=True, help_text="The product's own id for this customer.")
    name = models.CharField(max_length=255)
    email = models.EmailField(blank=True)
    currency = models.CharField(max_length=3, default="USD", validators=[validate_currency])
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=now, db_index=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.external_id})"


class Wallet(models.Model):
    class Policy(models.TextChoices):
        BLOCK = "block", "Block (hard limit)"
        OVERDRAFT = "overdraft", "Overdraft up to credit limit"

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        PAUSED = "paused", "Paused"

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="wallets")
    name = models.CharField(max_length=120, default="Default")
    is_default = models.BooleanField(default=True)
    policy = models.CharField(max_length=16, choices=Policy.choices, default=Policy.BLOCK)
    credit_limit = CreditField(default=ZERO, help_text="Overdraft wallets may go this far below zero.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    # Maintained by the ledger services under the wallet's row lock.
    ledger_balance = CreditField(default=ZERO, editable=False)
    overage = CreditField(default=ZERO, editable=False, help_text="Outstanding overage, billed later.")
    last_sequence = models.BigIntegerField(default=0, editable=False)
    # Set by the alerts app: billing calls events.balance_crossed() in the moving
    # transaction only when available balance crosses one of these marks, so a
    # charge that crosses nothing pays nothing for alerting.
    alert_below = CreditField(null=True, blank=True, editable=False)
    alert_at_or_above = CreditField(null=True, blank=True, editable=False)
    paused_reason = models.CharField(max_length=200, blank=True)
    # Maintained by billing.services.team_limits under the wallet lock: charges of
    # wallets without team spending limits never look for them (the hot path).
    has_team_limits = models.BooleanField(default=False, editable=False)
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["customer__name", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["customer"], condition=Q(is_default=True), name="wallet_one_default_per_customer"
            ),
            models.CheckConstraint(condition=Q(credit_limit__gte=0), name="wallet_credit_limit_not_negative"),
            models.CheckConstraint(condition=Q(overage__gte=0), name="wallet_overage_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.customer.name} · {self.name}"

    def crosses_alert_mark(self, before: Decimal, after: Decimal) -> bool:
        low, high = self.alert_below, self.alert_at_or_above
        return (low is not None and before >= low > after) or (high is not None and before < high <= after)


class TeamSpendingLimit(models.Model):
    """At most ``monthly_limit`` credits per calendar month (the customer's time zone)
    for usage of this wallet whose ``properties.team`` is ``team``."""

    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="team_limits")
    team = models.CharField(max_length=100, help_text="Matched exactly against usage properties.team.")
    monthly_limit = CreditField(help_text="Credits the team may spend per calendar month.")
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["wallet", "team"]
        constraints = [
            models.UniqueConstraint(fields=["wallet", "team"], name="team_limit_unique_per_wallet"),
            models.CheckConstraint(condition=Q(monthly_limit__gte=0), name="team_limit_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.team}: {self.monthly_limit} credits/month"


class TeamSpend(models.Model):
    """What a team spent in one month: the counter row charges lock (after the
    wallet) and add to, so concurrent charges of one team cannot exceed its limit."""

    team_limit = models.ForeignKey(TeamSpendingLimit, on_delete=models.CASCADE, related_name="spends")
    period_start = models.DateField(help_text="First day of the month, in the customer's time zone.")
    spent = CreditField(default=ZERO)

    class Meta:
        ordering = ["team_limit", "-period_start"]
        constraints = [
            models.UniqueConstraint(fields=["team_limit", "period_start"], name="team_spend_unique_per_period"),
            models.CheckConstraint(condition=Q(spent__gte=0), name="team_spend_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.team_limit.team} {self.period_start:%Y-%m}: {self.spent}"


class GrantQuerySet(models.QuerySet):
    def usable(self, *, at=None, feature_id: int | None = None) -> GrantQuerySet:
        """Grants a charge may consume at ``at`` (DESIGN.md §3: active, effective, unexpired, in scope)."""
        at = at or now()
        qs = self.filter(status=CreditGrant.Status.ACTIVE, effective_at__lte=at, remaining__gt=0).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=at)
        )
        if feature_id is not None:
            qs = qs.filter(Q(feature_id__isnull=True) | Q(feature_id=feature_id))
        else:
            qs = qs.filter(feature_id__isnull=True)
        return qs

    def in_consumption_order(self) -> GrantQuerySet:
        return self.order_by(
            "priority",
            models.F("expires_at").asc(nulls_last=True),
            "per_unit_cost_basis",
            "effective_at",
            "created_at",
            "pk",
        )


class CreditGrant(models.Model):
    class Kind(models.TextChoices):
        PREPAID = "prepaid", "Prepaid"
        PROMOTIONAL = "promotional", "Promotional"
        INCLUDED = "included", "Included in plan"
        CONTRACT = "contract", "Contract"
        ROLLOVER = "rollover", "Rollover"
        REFUND = "refund", "Refund"
        ADJUSTMENT = "adjustment", "Manual adjustment"

    class Source(models.TextChoices):
        MANUAL = "manual", "Manual"
        PACK_PURCHASE = "pack_purchase", "Pack purchase"
        AUTO_TOP_UP = "auto_top_up", "Auto top-up"
        PLAN_PERIOD = "plan_period", "Plan period"
        CONTRACT = "contract", "Contract"
        OPPORTUNITY = "opportunity", "Opportunity"
        REFERRAL = "referral", "Referral"
        PROMOTION = "promotion", "Promotion campaign"
        API = "api", "API"

    class Status(models.TextChoices):
        PENDING_APPROVAL = "pending_approval", "Pending approval"
        PENDING_PAYMENT = "pending_payment", "Pending payment"
        ACTIVE = "active", "Active"
        EXPIRED = "expired", "Expired"
        VOIDED = "voided", "Voided"
        DEPLETED = "depleted", "Depleted"
        REJECTED = "rejected", "Rejected"

    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="grants")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.MANUAL)
    original_amount = CreditField()
    remaining = CreditField()
    per_unit_cost_basis = RateField(default=ZERO, help_text="Money actually paid per credit (0 for promotional).")
    price_paid = MoneyField(default=ZERO)
    currency = models.CharField(max_length=3, default="USD", validators=[validate_currency])
    effective_at = models.DateTimeField(default=now)
    expires_at = models.DateTimeField(null=True, blank=True)
    priority = models.PositiveSmallIntegerField(default=50, validators=[MinValueValidator(0), MaxValueValidator(100)])
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ACTIVE, db_index=True)
    feature = models.ForeignKey(
        "Feature", null=True, blank=True, on_delete=models.PROTECT, help_text="Only usage of this feature may use it."
    )
    reason = models.CharField(max_length=500, blank=True)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=now)

    objects = GrantQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(original_amount__gt=0), name="grant_original_positive"),
            models.CheckConstraint(
                condition=Q(remaining__gte=0) & Q(remaining__lte=models.F("original_amount")),
                name="grant_remaining_within_original",
            ),
            models.CheckConstraint(condition=Q(per_unit_cost_basis__gte=0), name="grant_cost_basis_not_negative"),
            models.CheckConstraint(condition=Q(priority__gte=0, priority__lte=100), name="grant_priority_0_100"),
            models.CheckConstraint(
                condition=Q(expires_at__isnull=True) | Q(expires_at__gt=models.F("effective_at")),
                name="grant_expires_after_effective",
            ),
            models.UniqueConstraint(
                fields=["wallet", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="grant_idempotency_key_unique",
            ),
        ]
        permissions = [("approve_creditgrant", "Can approve or reject pending grants and adjustments")]
        indexes = [
            models.Index(fields=["wallet", "status", "priority"], name="grant_wallet_usable_idx"),
            models.Index(fields=["status", "expires_at"], name="grant_expiry_due_idx"),
        ]

    def __str__(self) -> str:
        return f"Grant #{self.pk} {self.get_kind_display()} {self.remaining}/{self.original_amount}"

    def is_usable(self, at=None, feature_id: int | None = None) -> bool:
        at = at or now()
        return (
            self.status == self.Status.ACTIVE
            and self.effective_at <= at
            and (self.expires_at is None or self.expires_at > at)
            and (self.feature_id is None or self.feature_id == feature_id)
        )


class LedgerEntry(models.Model):
    """One movement of credits on one grant (or overage on none). Append-only:
    a database trigger refuses UPDATE and DELETE (migration 0002)."""

    class Type(models.TextChoices):
        GRANT = "grant", "Grant"
        USAGE = "usage", "Usage"
        EXPIRY = "expiry", "Expiry"
        VOID = "void", "Void"
        REFUND = "refund", "Refund"
        REVERSAL = "reversal", "Reversal"
        ADJUSTMENT = "adjustment", "Adjustment"
        EXPIRY_CHANGE = "expiry_change", "Expiry changed"
        ROLLOVER_OUT = "rollover_out", "Rollover out"
        ROLLOVER_IN = "rollover_in", "Rollover in"
        OVERAGE = "overage", "Overage"
        OVERAGE_SETTLED = "overage_settled", "Overage settled"

    # Indexes every charge writes are kept to those a read needs: the wallet's and the
    # grant's are the leading columns of the (wallet, sequence) and (grant, type) ones.
    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="entries", db_index=False)
    grant = models.ForeignKey(CreditGrant, null=True, blank=True, on_delete=models.PROTECT, related_name="entries",
                              db_index=False)
    type = models.CharField(max_length=20, choices=Type.choices)
    amount = CreditField()
    sequence = models.BigIntegerField()
    balance_after = CreditField()
    usage_event = models.ForeignKey(
        "UsageEvent", null=True, blank=True, on_delete=models.PROTECT, related_name="entries"
    )
    reservation = models.ForeignKey(
        "Reservation", null=True, blank=True, on_delete=models.PROTECT, related_name="entries", db_index=False
    )
    reference = models.CharField(max_length=255, blank=True, help_text="What caused it: invoice, user, job …")
    idempotency_key = models.CharField(max_length=255, blank=True)
    memo = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["-wallet_id", "-sequence"]
        verbose_name_plural = "ledger entries"
        constraints = [
            models.UniqueConstraint(fields=["wallet", "sequence"], name="ledger_wallet_sequence_unique"),
        ]
        indexes = [
            models.Index(fields=["grant", "type"], name="ledger_grant_type_idx"),
            models.Index(fields=["created_at"], name="ledger_created_idx"),
            models.Index(fields=["reservation"], condition=Q(reservation__isnull=False), name="ledger_reservation_idx"),
        ]

    def __str__(self) -> str:
        return f"#{self.sequence} {self.type} {self.amount}"


class Feature(models.Model):
    key = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=255)
    unit = models.CharField(max_length=50, default="unit", help_text="What one unit of quantity is: request, token …")
    allow_zero_quantity = models.BooleanField(default=False)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["key"]

    def __str__(self) -> str:
        return self.key


class FeatureCostQuerySet(models.QuerySet):
    def effective(self, *, feature_id: int, at, customer_id: int | None = None) -> FeatureCost | None:
        """The rate version that prices usage of a feature at ``at``: a customer
        override effective then wins over the rate card."""
        candidates = self.filter(feature_id=feature_id, effective_from__lte=at)
        if customer_id is not None:
            override = (
                candidates.filter(customer_id=customer_id).order_by("-effective_from", "-pk").first()
            )
            if override is not None:
                return override
        return candidates.filter(customer__isnull=True).order_by("-effective_from", "-pk").first()


class FeatureCost(models.Model):
    """One version of a feature's credit cost, effective from a moment on.
    Versions are never edited once they have priced usage: add a new one."""

    feature = models.ForeignKey(Feature, on_delete=models.PROTECT, related_name="costs")
    customer = models.ForeignKey(
        Customer, null=True, blank=True, on_delete=models.PROTECT, related_name="feature_overrides",
        help_text="Set for a customer-specific override; empty for the rate card.",
    )
    credits_per_unit = RateField()
    effective_from = models.DateTimeField(default=now)
    note = models.CharField(max_length=255, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=now)

    objects = FeatureCostQuerySet.as_manager()

    class Meta:
        ordering = ["feature__key", "-effective_from"]
        verbose_name = "credit cost (rate version)"
        verbose_name_plural = "credit costs (rate versions)"
        constraints = [
            models.CheckConstraint(condition=Q(credits_per_unit__gte=0), name="feature_cost_not_negative"),
            models.UniqueConstraint(
                fields=["feature", "effective_from"], condition=Q(customer__isnull=True),
                name="feature_cost_card_version_unique",
            ),
            models.UniqueConstraint(
                fields=["feature", "customer", "effective_from"], condition=Q(customer__isnull=False),
                name="feature_cost_override_version_unique",
            ),
        ]
        indexes = [models.Index(fields=["feature", "customer", "-effective_from"], name="feature_cost_lookup_idx")]

    def __str__(self) -> str:
        who = f" for {self.customer.external_id}" if self.customer_id else ""
        return f"{self.feature.key}: {self.credits_per_unit}/unit from {self.effective_from:%Y-%m-%d %H:%M}{who}"


class UsageEvent(models.Model):
    class Status(models.TextChoices):
        CHARGED = "charged", "Charged"
        REJECTED = "rejected", "Rejected (insufficient credits)"

    # Like the ledger's: customer, wallet and feature lead the unique and composite
    # indexes below, and a hold's id is indexed only where there is one.
    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="usage_events", db_index=False)
    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="usage_events", db_index=False)
    feature = models.ForeignKey(Feature, on_delete=models.PROTECT, related_name="usage_events", db_index=False)
    event_id = models.CharField(max_length=255)
    quantity = models.DecimalField(max_digits=20, decimal_places=6)
    occurred_at = models.DateTimeField()
    properties = models.JSONField(default=dict, blank=True)
    rate = models.ForeignKey(FeatureCost, on_delete=models.PROTECT, related_name="+")
    credits_per_unit = RateField()
    credits = CreditField()
    status = models.CharField(max_length=16, choices=Status.choices)
    request_hash = models.CharField(max_length=64)
    response = models.JSONField(default=dict, help_text="The answer given, replayed for the same event id.")
    reservation = models.ForeignKey(
        "Reservation", null=True, blank=True, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["customer", "event_id"], name="usage_event_id_unique_per_customer"),
        ]
        indexes = [
            models.Index(fields=["wallet", "-created_at"], name="usage_wallet_created_idx"),
            models.Index(fields=["feature", "occurred_at"], name="usage_feature_time_idx"),
            models.Index(fields=["reservation"], condition=Q(reservation__isnull=False), name="usage_reservation_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} ({self.feature_id})"


class Reservation(models.Model):
    class Status(models.TextChoices):
        OPEN = "open", "Open"
        CAPTURED = "captured", "Captured"
        RELEASED = "released", "Released"
        EXPIRED = "expired", "Expired"

    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="reservations")
    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="reservations")
    feature = models.ForeignKey(Feature, null=True, blank=True, on_delete=models.PROTECT)
    quantity = models.DecimalField(max_digits=20, decimal_places=6, null=True, blank=True)
    amount = CreditField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    expires_at = models.DateTimeField()
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    usage_event = models.ForeignKey(UsageEvent, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    closed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.CheckConstraint(condition=Q(amount__gt=0), name="reservation_amount_positive")]
        indexes = [models.Index(fields=["wallet", "status", "expires_at"], name="reservation_open_idx")]

    def __str__(self) -> str:
        return f"Hold #{self.pk} {self.amount} ({self.status})"

    def is_open(self, at=None) -> bool:
        return self.status == self.Status.OPEN and self.expires_at > (at or now())


class CreditPack(models.Model):
    class Kind(models.TextChoices):
        PREPAID = "prepaid", "Prepaid"
        PROMOTIONAL = "promotional", "Promotional"

    code = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=255)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.PREPAID)
    credits = CreditField()
    price = MoneyField(default=ZERO, help_text="List price of one pack; 0 for promotional packs.")
    currency = models.CharField(max_length=3, default="USD", validators=[validate_currency])
    validity_days = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: never expires.")
    priority = models.PositiveSmallIntegerField(default=50, validators=[MaxValueValidator(100)])
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["kind", "credits"]
        constraints = [
            models.CheckConstraint(condition=Q(credits__gt=0), name="pack_credits_positive"),
            models.CheckConstraint(condition=Q(price__gte=0), name="pack_price_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.credits} credits)"

    def clean(self) -> None:
        if self.kind == self.Kind.PROMOTIONAL and self.price and self.price > 0:
            raise ValidationError({"price": "Promotional packs are free: set the price to 0."})
        if self.kind == self.Kind.PREPAID and (self.price is None or self.price <= 0):
            raise ValidationError({"price": "A prepaid pack needs a price."})

    def discount_for(self, quantity: int) -> Decimal:
        """The volume discount (percent) that applies when buying ``quantity`` packs."""
        tier = self.tiers.filter(min_quantity__lte=quantity).order_by("-min_quantity").first()
        return tier.discount_percent if tier else ZERO


class PackDiscountTier(models.Model):
    pack = models.ForeignKey(CreditPack, on_delete=models.CASCADE, related_name="tiers")
    min_quantity = models.PositiveIntegerField(validators=[MinValueValidator(2)])
    discount_percent = models.DecimalField(
        max_digits=5, decimal_places=2, validators=[MinValueValidator(0), MaxValueValidator(100)]
    )

    class Meta:
        ordering = ["pack", "min_quantity"]
        constraints = [
            models.UniqueConstraint(fields=["pack", "min_quantity"], name="pack_tier_unique"),
            models.CheckConstraint(
                condition=Q(discount_percent__gte=0, discount_percent__lt=100), name="pack_tier_discount_range"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.min_quantity}+ packs: {self.discount_percent}% off"


class PackPurchase(models.Model):
    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="pack_purchases")
    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="pack_purchases")
    pack = models.ForeignKey(CreditPack, on_delete=models.PROTECT, related_name="purchases")
    quantity = models.PositiveIntegerField(default=1)
    credits = CreditField()
    list_price = MoneyField()
    discount_percent = models.DecimalField(max_digits=5, decimal_places=2, default=ZERO)
    total_price = MoneyField()
    currency = models.CharField(max_length=3)
    grant = models.OneToOneField(CreditGrant, on_delete=models.PROTECT, related_name="purchase")
    idempotency_key = models.CharField(max_length=255, null=True, blank=True, unique=True)
    purchased_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.quantity} × {self.pack.code} for {self.customer.external_id}"


class Adjustment(models.Model):
    """A manual correction of a wallet's credits. Always waits for a second person."""

    class Status(models.TextChoices):
        PENDING_APPROVAL = "pending_approval", "Pending approval"
        APPLIED = "applied", "Applied"
        REJECTED = "rejected", "Rejected"

    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="adjustments")
    amount = CreditField(help_text="Positive adds credits, negative removes them in consumption order.")
    reason = models.CharField(max_length=500)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING_APPROVAL)
    grant = models.ForeignKey(CreditGrant, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.CheckConstraint(condition=~Q(amount=0), name="adjustment_not_zero")]

    def __str__(self) -> str:
        return f"Adjustment {self.amount:+} on {self.wallet}"


class IdempotencyRecord(models.Model):
    """The first answer given for an Idempotency-Key on one operation."""

    scope = models.CharField(max_length=100, help_text="Operation, e.g. grants.create:<customer>.")
    key = models.CharField(max_length=255)
    request_hash = models.CharField(max_length=64)
    status_code = models.PositiveSmallIntegerField()
    response = models.JSONField()
    created_at = models.DateTimeField(default=now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "key"], name="idempotency_scope_key_unique")]

    def __str__(self) -> str:
        return f"{self.scope} {self.key}"


class ApiKey(models.Model):
    class Scope(models.TextChoices):
        USAGE_WRITE = "usage:write", "Charge usage and hold credits"
        BALANCE_READ = "balance:read", "Read customers, balances and ledgers"
        ADMIN = "admin", "Manage customers, features, costs and grants"

    name = models.CharField(max_length=120)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    hashed_key = models.CharField(max_length=64, editable=False)
    scopes = models.JSONField(default=list)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=now)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class AuditEvent(models.Model):
    """Who changed what, when: written by services and admin saves."""

    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    actor_label = models.CharField(max_length=150, blank=True, help_text="API key or job when no staff user.")
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64)
    object_repr = models.CharField(max_length=255, blank=True)
    changes = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=now, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["object_type", "object_id"], name="audit_object_idx")]

    def __str__(self) -> str:
        return f"{self.action} {self.object_type}#{self.object_id}"


class OutboxEvent(models.Model):
    """Domain events recorded in the transaction that caused them (see billing.events)."""

    topic = models.CharField(max_length=64, db_index=True)
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=now)
    dispatched_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["dispatched_at", "created_at"], name="outbox_pending_idx")]

    def __str__(self) -> str:
        return f"{self.topic} #{self.pk}"


class JobRun(models.Model):
    """Progress of a long or clock-driven job, shown in the admin."""

    name = models.CharField(max_length=100)
    started_at = models.DateTimeField(default=now)
    finished_at = models.DateTimeField(null=True, blank=True)
    total = models.PositiveIntegerField(default=0)
    done = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=16, default="running")
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.name} {self.started_at:%Y-%m-%d %H:%M} ({self.status})"


# --- Invoices and payments ---------------------------------------------------
# Written only by billing.services.invoices (DESIGN.md §5).


class BillingProfile(models.Model):
    """How a customer is invoiced: where invoices go, payment terms, tax rate."""

    customer = models.OneToOneField(Customer, on_delete=models.PROTECT, related_name="billing_profile")
    billing_email = models.EmailField(blank=True, help_text="Empty: the customer's email.")
    net_terms_days = models.PositiveSmallIntegerField(default=30, help_text="Days from issue to due date.")
    tax_rate = models.DecimalField(
        max_digits=7, decimal_places=4, default=ZERO, validators=[MinValueValidator(0), MaxValueValidator(100)],
        help_text="Percent added to each invoice's subtotal.",
    )

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(tax_rate__gte=0, tax_rate__lte=100), name="billing_profile_tax_range"),
        ]

    def __str__(self) -> str:
        return f"Billing profile of {self.customer.external_id}"


class InvoiceNumberCounter(models.Model):
    """The last invoice number given out in a year. Incremented under its row
    lock in the issuing transaction, so numbers run 1..n without gaps."""

    year = models.PositiveSmallIntegerField(unique=True)
    last_number = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.year}: {self.last_number}"


class Invoice(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        ISSUED = "issued", "Issued"
        PAID = "paid", "Paid"
        VOID = "void", "Void"

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="invoices")
    # Given at issue time only: drafts never burn a number.
    number = models.CharField(max_length=32, null=True, blank=True, unique=True, editable=False)
    year = models.PositiveSmallIntegerField(null=True, blank=True, editable=False)
    sequence = models.PositiveIntegerField(null=True, blank=True, editable=False)
    currency = models.CharField(max_length=3, validators=[validate_currency])
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.DRAFT, db_index=True)
    tax_rate = models.DecimalField(max_digits=7, decimal_places=4, default=ZERO)
    net_terms_days = models.PositiveSmallIntegerField(default=30)
    subtotal = MoneyField(default=ZERO, editable=False)
    tax = MoneyField(default=ZERO, editable=False)
    total = MoneyField(default=ZERO, editable=False)
    amount_paid = MoneyField(default=ZERO, editable=False)
    billing_email = models.EmailField(blank=True)
    memo = models.CharField(max_length=500, blank=True)
    issued_at = models.DateTimeField(null=True, blank=True, editable=False)
    due_at = models.DateTimeField(null=True, blank=True, editable=False)
    paid_at = models.DateTimeField(null=True, blank=True, editable=False)
    voided_at = models.DateTimeField(null=True, blank=True, editable=False)
    void_reason = models.CharField(max_length=500, blank=True, editable=False)
    emailed_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.UniqueConstraint(fields=["year", "sequence"], name="invoice_number_unique_per_year"),
            models.CheckConstraint(
                condition=Q(status="draft") | Q(status="void", number__isnull=True) | Q(number__isnull=False),
                name="invoice_issued_has_number",
            ),
            models.CheckConstraint(condition=Q(tax_rate__gte=0, tax_rate__lte=100), name="invoice_tax_range"),
            models.CheckConstraint(condition=Q(amount_paid__gte=0), name="invoice_paid_not_negative"),
        ]
        indexes = [models.Index(fields=["customer", "-created_at"], name="invoice_customer_idx")]

    def __str__(self) -> str:
        return self.number or f"Draft invoice #{self.pk}"

    @property
    def amount_due(self) -> Decimal:
        return self.total - self.amount_paid


class InvoiceLine(models.Model):
    class Kind(models.TextChoices):
        PACK_PURCHASE = "pack_purchase", "Pack purchase"
        PLAN_FEE = "plan_fee", "Plan fee"
        OVERAGE = "overage", "Overage"
        TRUE_UP = "true_up", "True-up"
        CONTRACT = "contract", "Contract commitment"
        MANUAL = "manual", "Manual"
        CREDIT_NOTE = "credit_note", "Credit note"

    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="lines")
    position = models.PositiveSmallIntegerField(default=0)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    description = models.CharField(max_length=500)
    quantity = models.DecimalField(max_digits=20, decimal_places=6)
    unit_price = RateField()
    amount = MoneyField(help_text="quantity × unit price, rounded to the currency.")
    pack_purchase = models.ForeignKey(
        PackPurchase, null=True, blank=True, on_delete=models.PROTECT, related_name="invoice_lines"
    )
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["invoice", "position", "pk"]
        constraints = [
            models.CheckConstraint(condition=Q(quantity__gt=0), name="invoice_line_quantity_positive"),
            models.CheckConstraint(
                condition=Q(kind="credit_note", amount__lte=0) | (~Q(kind="credit_note") & Q(amount__gte=0)),
                name="invoice_line_sign_by_kind",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.description} ({self.amount})"


class Payment(models.Model):
    class Method(models.TextChoices):
        MANUAL = "manual", "Recorded by finance"
        WEBHOOK = "webhook", "Payment provider webhook"

    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="payments")
    amount = MoneyField()
    currency = models.CharField(max_length=3)
    method = models.CharField(max_length=8, choices=Method.choices, default=Method.MANUAL)
    reference = models.CharField(max_length=255, blank=True, help_text="Bank transfer or provider reference.")
    provider_event_id = models.CharField(max_length=255, null=True, blank=True, unique=True, editable=False)
    received_at = models.DateTimeField(default=now)
    recorded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["-received_at", "-pk"]
        constraints = [models.CheckConstraint(condition=Q(amount__gt=0), name="payment_amount_positive")]

    def __str__(self) -> str:
        return f"{self.amount} {self.currency} on {self.invoice}"


# --- Plans and subscriptions ---------------------------------------------------
# Written only by billing.services.plans (DESIGN.md §6).


class Plan(models.Model):
    class Period(models.TextChoices):
        MONTHLY = "monthly", "Monthly"
        ANNUAL = "annual", "Annual"

    class OveragePolicy(models.TextChoices):
        BLOCK = "block", "Block when the included credits are used up"
        OVERDRAFT = "overdraft", "Overdraft, billed at the overage price"

    code = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=255)
    currency = models.CharField(max_length=3, default="USD", validators=[validate_currency])
    period = models.CharField(max_length=8, choices=Period.choices, default=Period.MONTHLY)
    base_fee = MoneyField(default=ZERO, help_text="Billed per period.")
    included_credits = CreditField(default=ZERO, help_text="Granted at each period start, expiring at its end.")
    overage_policy = models.CharField(max_length=10, choices=OveragePolicy.choices, default=OveragePolicy.BLOCK)
    overage_price = RateField(default=ZERO, help_text="Money per credit used beyond the included credits.")
    overage_cap = CreditField(default=ZERO, help_text="Most overage credits allowed per wallet (overdraft only).")
    rollover_percent = models.DecimalField(
        max_digits=5, decimal_places=2, default=ZERO, validators=[MinValueValidator(0), MaxValueValidator(100)],
        help_text="Unused included credits carried into later periods, capped at this percent of the included amount.",
    )
    rollover_periods = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1)], help_text="How many periods carried-over credits stay usable.",
    )
    trial_credits = CreditField(default=ZERO, help_text="Promotional credits at sign-up, usable in the first period.")
    trial_days = models.PositiveSmallIntegerField(
        default=0, help_text="Days a new subscription is trialing: no fee is billed for that time. 0: no trial.",
    )
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["code"]
        constraints = [
            models.CheckConstraint(condition=Q(base_fee__gte=0), name="plan_fee_not_negative"),
            models.CheckConstraint(condition=Q(included_credits__gte=0), name="plan_included_not_negative"),
            models.CheckConstraint(condition=Q(overage_price__gte=0, overage_cap__gte=0),
                                   name="plan_overage_not_negative"),
            models.CheckConstraint(condition=Q(rollover_percent__gte=0, rollover_percent__lte=100),
                                   name="plan_rollover_percent_range"),
            models.CheckConstraint(condition=Q(rollover_periods__gte=1, trial_credits__gte=0),
                                   name="plan_rollover_trial_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.code})"

    @property
    def months(self) -> int:
        return 12 if self.period == self.Period.ANNUAL else 1


class Subscription(models.Model):
    class Status(models.TextChoices):
        TRIALING = "trialing", "Trialing"
        ACTIVE = "active", "Active"
        PAST_DUE = "past_due", "Past due"
        CANCELED = "canceled", "Canceled"

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="subscriptions")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="subscriptions")
    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="subscriptions")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE, db_index=True)
    # The local date periods are counted from, in the customer's time zone: a
    # subscription anchored on the 31st runs to the last day of shorter months.
    anchor_date = models.DateField(editable=False)
    period_index = models.PositiveIntegerField(default=0, editable=False)
    current_period_start = models.DateTimeField(editable=False)
    current_period_end = models.DateTimeField(editable=False, db_index=True)
    cancel_at_period_end = models.BooleanField(default=False)
    canceled_at = models.DateTimeField(null=True, blank=True, editable=False)
    trial_ends_at = models.DateTimeField(null=True, blank=True, editable=False,
                                         help_text="No fee is billed before it; trialing until then.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.UniqueConstraint(fields=["wallet"], condition=~Q(status="canceled"),
                                    name="subscription_one_live_per_wallet"),
            models.CheckConstraint(condition=Q(current_period_end__gt=models.F("current_period_start")),
                                   name="subscription_period_ordered"),
        ]

    def __str__(self) -> str:
        return f"{self.customer.external_id} on {self.plan.code}"


class SubscriptionPeriod(models.Model):
    """One billing period of a subscription: its included grant when opened,
    its invoice when closed. Unique per start, so closing is idempotent."""

    subscription = models.ForeignKey(Subscription, on_delete=models.PROTECT, related_name="periods")
    index = models.PositiveIntegerField()
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    included_grant = models.OneToOneField(
        CreditGrant, null=True, blank=True, on_delete=models.PROTECT, related_name="subscription_period"
    )
    overage_credits = CreditField(default=ZERO)
    invoice = models.OneToOneField(
        "Invoice", null=True, blank=True, on_delete=models.PROTECT, related_name="subscription_period"
    )
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["subscription", "index"]
        constraints = [
            models.UniqueConstraint(fields=["subscription", "index"], name="subscription_period_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.subscription} period {self.index + 1} ({self.starts_at:%Y-%m-%d} – {self.ends_at:%Y-%m-%d})"


class SubscriptionChange(models.Model):
    """A mid-period plan change: the proration billed on the period's closing
    invoice (a credit for the old plan's unused fee, a charge for the new plan's
    remaining fee) and the included credits added or taken back."""

    subscription = models.ForeignKey(Subscription, on_delete=models.PROTECT, related_name="changes")
    period = models.ForeignKey(SubscriptionPeriod, on_delete=models.PROTECT, related_name="changes")
    from_plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="+")
    to_plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="+")
    effective_at = models.DateTimeField()
    remaining_fraction = models.DecimalField(
        max_digits=11, decimal_places=10, help_text="Billable share of the period left at the change (0..1).",
    )
    unused_credit = MoneyField(help_text="The old plan's fee for the rest of the period, credited (>= 0).")
    remaining_charge = MoneyField(help_text="The new plan's fee for the rest of the period (>= 0).")
    credits_delta = CreditField(help_text="Included credits added (+) or taken back (-) for the rest of the period.")
    included_grant = models.OneToOneField(
        CreditGrant, null=True, blank=True, on_delete=models.PROTECT, related_name="subscription_change",
        help_text="The included grant that adds credits when the new plan includes more.",
    )
    overage_credits = CreditField(default=ZERO, help_text="Overage used under the old plan, billed at its price.")
    overage_price = RateField(default=ZERO)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["subscription", "effective_at", "pk"]
        constraints = [
            models.CheckConstraint(condition=Q(remaining_fraction__gte=0, remaining_fraction__lte=1),
                                   name="subscription_change_fraction_range"),
            models.CheckConstraint(condition=Q(unused_credit__gte=0, remaining_charge__gte=0, overage_credits__gte=0),
                                   name="subscription_change_amounts_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.subscription}: {self.from_plan.code} → {self.to_plan.code} at {self.effective_at:%Y-%m-%d %H:%M}"


# --- Enterprise contracts --------------------------------------------------------
# Written only by billing.services.contracts (DESIGN.md §6).


class Contract(models.Model):
    """An enterprise commitment on one pooled wallet: credits per year (or spend
    per year) at a negotiated price, paid upfront or in quarterly instalments
    that each release their credits; consumption above what was released runs
    as overdraft and is billed at each true-up date. Terms are editable while
    the contract is a draft; activation fixes its instalments and true-ups."""

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        ACTIVE = "active", "Active"
        ENDED = "ended", "Ended"
        CANCELED = "canceled", "Canceled"

    class Commitment(models.TextChoices):
        CREDITS = "credits", "Committed credits per year"
        SPEND = "spend", "Committed spend per year"

    class PaymentSchedule(models.TextChoices):
        UPFRONT = "upfront", "Upfront, each contract year"
        QUARTERLY = "quarterly", "Quarterly instalments"

    class Cadence(models.TextChoices):
        ANNUAL = "annual", "Annual"
        QUARTERLY = "quarterly", "Quarterly"

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="contracts")
    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="contracts",
                               help_text="The organisation's pooled wallet; all teams consume from it.")
    reference = models.CharField(max_length=64, blank=True, help_text="The signed contract's number.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DRAFT, db_index=True)
    starts_at = models.DateTimeField()
    term_months = models.PositiveSmallIntegerField(default=12, validators=[MinValueValidator(1)])
    ends_at = models.DateTimeField(editable=False, help_text="Start + term; a renewal moves it on.")
    commitment = models.CharField(max_length=8, choices=Commitment.choices, default=Commitment.CREDITS)
    committed_credits = CreditField(default=ZERO, help_text="Per contract year (derived for spend commitments).")
    committed_spend = MoneyField(default=ZERO, help_text="Per contract year, for spend commitments.")
    currency = models.CharField(max_length=3, default="USD", validators=[validate_currency])
    list_price = RateField(help_text="Negotiated price per credit before volume tiers and discount.")
    discount_percent = models.DecimalField(
        max_digits=5, decimal_places=2, default=ZERO, validators=[MinValueValidator(0), MaxValueValidator(100)])
    payment_schedule = models.CharField(max_length=10, choices=PaymentSchedule.choices,
                                        default=PaymentSchedule.QUARTERLY)
    true_up_cadence = models.CharField(max_length=10, choices=Cadence.choices, default=Cadence.ANNUAL)
    true_up_price = RateField(null=True, blank=True,
                              help_text="Money per overage credit at true-up; empty: the effective contract price.")
    rollover_percent = models.DecimalField(
        max_digits=5, decimal_places=2, default=ZERO, validators=[MinValueValidator(0), MaxValueValidator(100)],
        help_text="Share of the unused credits carried into the renewed term.")
    credit_limit = CreditField(null=True, blank=True,
                               help_text="Overdraft allowed above the commitment; empty: the committed credits per "
                                         "year × CREDITDESK_CONTRACT_OVERDRAFT_FACTOR.")
    activated_at = models.DateTimeField(null=True, blank=True, editable=False)
    ended_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["-starts_at", "-pk"]
        constraints = [
            models.CheckConstraint(condition=Q(ends_at__gt=models.F("starts_at")), name="contract_term_ordered"),
            models.CheckConstraint(condition=Q(committed_credits__gte=0, committed_spend__gte=0, list_price__gte=0),
                                   name="contract_amounts_not_negative"),
            models.CheckConstraint(condition=Q(discount_percent__gte=0, discount_percent__lte=100,
                                               rollover_percent__gte=0, rollover_percent__lte=100),
                                   name="contract_percents_range"),
            models.UniqueConstraint(fields=["wallet"], condition=Q(status__in=["draft", "active"]),
                                    name="contract_one_live_per_wallet"),
        ]

    def __str__(self) -> str:
        return f"Contract {self.reference or f'#{self.pk}'} ({self.customer.external_id})"

    def clean(self) -> None:
        if self.wallet_id and self.customer_id and self.wallet.customer_id != self.customer_id:
            raise ValidationError({"wallet": "The pooled wallet must belong to the contract's customer."})
        if self.commitment == self.Commitment.CREDITS and self.committed_credits <= 0:
            raise ValidationError({"committed_credits": "Commit to more than zero credits per year."})
        if self.commitment == self.Commitment.SPEND and self.committed_spend <= 0:
            raise ValidationError({"committed_spend": "Commit to more than zero spend per year."})
        if self.payment_schedule == self.PaymentSchedule.QUARTERLY or self.true_up_cadence == self.Cadence.QUARTERLY:
            if self.term_months and self.term_months % 3:
                raise ValidationError({"term_months": "Quarterly schedules need a term in whole quarters."})


class ContractPriceTier(models.Model):
    """Volume tier: a commitment of at least ``min_credits`` a year pays this list price per credit."""

    contract = models.ForeignKey(Contract, on_delete=models.CASCADE, related_name="tiers")
    min_credits = CreditField()
    price_per_credit = RateField()

    class Meta:
        ordering = ["contract", "min_credits"]
        constraints = [
            models.UniqueConstraint(fields=["contract", "min_credits"], name="contract_tier_unique"),
            models.CheckConstraint(condition=Q(min_credits__gte=0, price_per_credit__gte=0),
                                   name="contract_tier_not_negative"),
        ]

    def __str__(self) -> str:
        return f"from {self.min_credits} credits: {self.price_per_credit}"


class ContractInstalment(models.Model):
    """One payment of the schedule: released on its due date as an issued invoice
    and a ``contract`` grant of its credits (once: ``released_at``)."""

    contract = models.ForeignKey(Contract, on_delete=models.PROTECT, related_name="instalments")
    index = models.PositiveIntegerField()
    due_at = models.DateTimeField(db_index=True)
    expires_at = models.DateTimeField(help_text="Its credits expire at the end of their contract year.")
    credits = CreditField()
    unit_price = RateField(default=ZERO, help_text="Effective price per credit, fixed at release.")
    amount = MoneyField(default=ZERO)
    invoice = models.OneToOneField("Invoice", null=True, blank=True, on_delete=models.PROTECT,
                                   related_name="contract_instalment")
    grant = models.OneToOneField(CreditGrant, null=True, blank=True, on_delete=models.PROTECT,
                                 related_name="contract_instalment")
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["contract", "index"]
        constraints = [
            models.UniqueConstraint(fields=["contract", "index"], name="contract_instalment_unique"),
            models.CheckConstraint(condition=Q(credits__gt=0), name="contract_instalment_credits_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.contract} instalment {self.index + 1} due {self.due_at:%Y-%m-%d}"


class TrueUp(models.Model):
    """One true-up date of a contract: the overage outstanding then is settled
    by a paid-for grant and billed on a ``true_up`` invoice line (once: ``settled_at``)."""

    contract = models.ForeignKey(Contract, on_delete=models.PROTECT, related_name="true_ups")
    period_start = models.DateTimeField()
    period_end = models.DateTimeField(db_index=True, help_text="The true-up date.")
    committed = CreditField(default=ZERO)
    consumed = CreditField(default=ZERO)
    overage_credits = CreditField(default=ZERO)
    unit_price = RateField(default=ZERO)
    amount = MoneyField(default=ZERO)
    invoice = models.OneToOneField("Invoice", null=True, blank=True, on_delete=models.PROTECT,
                                   related_name="true_up")
    grant = models.OneToOneField(CreditGrant, null=True, blank=True, on_delete=models.PROTECT,
                                 related_name="true_up")
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["contract", "period_end"]
        verbose_name = "true-up"
        constraints = [
            models.UniqueConstraint(fields=["contract", "period_end"], name="true_up_unique_per_date"),
            models.CheckConstraint(condition=Q(period_end__gt=models.F("period_start")),
                                   name="true_up_period_ordered"),
        ]

    def __str__(self) -> str:
        return f"{self.contract} true-up {self.period_end:%Y-%m-%d}"


class ContractAmendment(models.Model):
    """A change to a live contract: credits added mid-term (a grant and an
    invoice), a new price from a date, or a renewal (term extended, unused
    credits rolled over)."""

    class Kind(models.TextChoices):
        ADD_CREDITS = "add_credits", "Credits added"
        PRICE_CHANGE = "price_change", "Price changed"
        RENEWAL = "renewal", "Renewal"

    contract = models.ForeignKey(Contract, on_delete=models.PROTECT, related_name="amendments")
    kind = models.CharField(max_length=12, choices=Kind.choices)
    effective_at = models.DateTimeField()
    credits = CreditField(default=ZERO, help_text="Added, or rolled over on renewal.")
    list_price = RateField(null=True, blank=True, help_text="New list price per credit from effective_at.")
    true_up_price = RateField(null=True, blank=True, help_text="New true-up price from effective_at.")
    months = models.PositiveSmallIntegerField(default=0, help_text="Months a renewal added to the term.")
    invoice = models.OneToOneField("Invoice", null=True, blank=True, on_delete=models.PROTECT,
                                   related_name="contract_amendment")
    grant = models.OneToOneField(CreditGrant, null=True, blank=True, on_delete=models.PROTECT,
                                 related_name="contract_amendment")
    note = models.CharField(max_length=500, blank=True)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["contract", "effective_at", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["contract", "idempotency_key"], condition=Q(idempotency_key__isnull=False),
                                    name="contract_amendment_idempotency"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} on {self.contract} ({self.effective_at:%Y-%m-%d})"


# --- Refunds and credit notes ---------------------------------------------------
# Written only by billing.services.refunds (issue 4: refunds of unused prepaid credits).


class RefundRequest(models.Model):
    """A request to give back a paid grant's unused credits: asked by finance or
    support, decided by another person with the approve permission."""

    class Status(models.TextChoices):
        PENDING_APPROVAL = "pending_approval", "Pending approval"
        REFUNDED = "refunded", "Approved and refunded"
        REJECTED = "rejected", "Rejected"

    grant = models.ForeignKey(CreditGrant, on_delete=models.PROTECT, related_name="refund_requests")
    credits = CreditField(null=True, blank=True, help_text="Empty: all credits still unused at approval.")
    reason = models.CharField(max_length=500)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING_APPROVAL, db_index=True)
    refunded_credits = CreditField(default=ZERO, editable=False)
    amount = MoneyField(default=ZERO, editable=False, help_text="Money credited back to the customer.")
    currency = models.CharField(max_length=3, validators=[validate_currency])
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_note = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.CheckConstraint(condition=Q(credits__isnull=True) | Q(credits__gt=0),
                                   name="refund_request_credits_positive"),
            models.CheckConstraint(condition=Q(refunded_credits__gte=0, amount__gte=0),
                                   name="refund_request_amounts_not_negative"),
        ]
        permissions = [("approve_refundrequest", "Can approve or reject refund requests")]

    def __str__(self) -> str:
        what = f"{self.credits.normalize():f} credits" if self.credits is not None else "all unused credits"
        return f"Refund #{self.pk}: {what} of grant #{self.grant_id}"


class CreditNote(models.Model):
    """The document of an approved refund: numbered CN-<year>-<n> without gaps
    per year (its own series), linked to the grant, the purchase and the invoice
    the credits were bought on, and to the ``refund`` ledger entry."""

    number = models.CharField(max_length=32, unique=True)
    year = models.PositiveSmallIntegerField()
    sequence = models.PositiveIntegerField()
    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="credit_notes")
    grant = models.ForeignKey(CreditGrant, on_delete=models.PROTECT, related_name="credit_notes")
    refund_request = models.OneToOneField(RefundRequest, on_delete=models.PROTECT, related_name="credit_note")
    # No database foreign key: the ledger refuses DELETE and TRUNCATE through its own
    # triggers (DESIGN.md §4.5), which a foreign key from here would pre-empt.
    ledger_entry = models.OneToOneField(LedgerEntry, on_delete=models.PROTECT, related_name="credit_note",
                                        db_constraint=False)
    pack_purchase = models.ForeignKey(
        PackPurchase, null=True, blank=True, on_delete=models.PROTECT, related_name="credit_notes"
    )
    invoice = models.ForeignKey(
        "Invoice", null=True, blank=True, on_delete=models.PROTECT, related_name="credit_notes",
        help_text="The invoice the refunded credits were bought on.",
    )
    description = models.CharField(max_length=500)
    credits = CreditField()
    unit_price = RateField(help_text="The grant's cost basis: money paid per credit.")
    amount = MoneyField(help_text="Credits × unit price, rounded once to the currency.")
    currency = models.CharField(max_length=3, validators=[validate_currency])
    reason = models.CharField(max_length=500, blank=True)
    issued_at = models.DateTimeField(db_index=True)
    billing_email = models.EmailField(blank=True, help_text="Where the credit note is emailed.")
    emailed_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        ordering = ["-issued_at", "-pk"]
        constraints = [
            models.UniqueConstraint(fields=["year", "sequence"], name="credit_note_number_unique_per_year"),
            models.CheckConstraint(condition=Q(credits__gt=0, amount__gte=0), name="credit_note_amounts_valid"),
        ]
        permissions = [("view_revenue_report", "Can view the revenue report and revenue schedules")]

    def __str__(self) -> str:
        return self.number
