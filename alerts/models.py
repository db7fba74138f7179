"""Alert rules and their per-wallet state, notifications and their delivery log,
webhook endpoints, auto top-up settings and runs.

Nothing here moves credits: auto top-ups buy packs through billing's services
(``alerts.services.auto_top_up``). Rule resolution, thresholds and transitions
live in ``alerts.services.evaluation``; this module holds fields and single-row rules.
"""

from __future__ import annotations

import base64
import secrets
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils.timezone import now

from billing.models import CreditField, CreditGrant, CreditPack, Customer, PackPurchase, Wallet


class Severity(models.TextChoices):
    INFO = "info", "Info"
    WARNING = "warning", "Warning"
    CRITICAL = "critical", "Critical"


SEVERITY_RANK = {Severity.INFO: 1, Severity.WARNING: 2, Severity.CRITICAL: 3}


class EventType(models.TextChoices):
    """What a notification is about. The ``wallet.*`` and ``grant.*`` types are
    also the Standard Webhooks event types endpoints subscribe to."""

    BALANCE_LOW = "wallet.balance_low", "Balance low"
    BALANCE_RECOVERED = "wallet.balance_recovered", "Balance recovered"
    DEPLETED = "wallet.depleted", "Wallet depleted"
    PAUSED = "wallet.paused", "Wallet paused"
    RESUMED = "wallet.resumed", "Wallet resumed"
    TOPPED_UP = "wallet.topped_up", "Wallet topped up"
    GRANT_EXPIRING_SOON = "grant.expiring_soon", "Grant expiring soon"
    GRANT_EXPIRED = "grant.expired", "Grant expired"
    # Internal notices to staff; never sent to webhooks.
    TOP_UP_RUNAWAY = "auto_top_up.cap_reached", "Auto top-up monthly cap reached"
    TOP_UP_DISABLED = "auto_top_up.disabled", "Auto top-up disabled"
    TOP_UP_AWAITING_APPROVAL = "auto_top_up.awaiting_approval", "Auto top-up awaiting approval"
    ENDPOINT_DISABLED = "webhook.endpoint_disabled", "Webhook endpoint disabled"


WEBHOOK_EVENT_TYPES = [t for t in EventType.values if t.startswith(("wallet.", "grant."))]


def default_expiring_soon_days() -> dict:
    return {"prepaid": 14, "promotional": 3}


def validate_event_types(value) -> None:
    if not isinstance(value, list) or any(v not in WEBHOOK_EVENT_TYPES for v in value):
        raise ValidationError(f"Use a list of event types from: {', '.join(WEBHOOK_EVENT_TYPES)}.")


def validate_expiring_soon_days(value) -> None:
    if not isinstance(value, dict) or any(
        k not in CreditGrant.Kind.values or not isinstance(v, int) or v < 0 for k, v in value.items()
    ):
        raise ValidationError('Use {"<grant kind>": <days>, …}, e.g. {"prepaid": 14, "promotional": 3}.')


class AlertsProfile(models.Model):
    """Who hears about a customer's wallets: its billing and technical contacts,
    and the staff member who owns the account."""

    customer = models.OneToOneField(Customer, on_delete=models.CASCADE, related_name="alerts_profile")
    billing_email = models.EmailField(blank=True, help_text="Empty: the customer's own email.")
    billing_phone = models.CharField(max_length=32, blank=True, help_text="E.164, e.g. +14155550100.")
    technical_email = models.EmailField(blank=True)
    technical_phone = models.CharField(max_length=32, blank=True)
    account_owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    quiet_hours_start = models.TimeField(
        null=True, blank=True, help_text="SMS to the customer's contacts wait until quiet hours end "
                                         "(customer's time zone).")
    quiet_hours_end = models.TimeField(null=True, blank=True)

    class Meta:
        verbose_name = "customer alert contacts"
        verbose_name_plural = "customer alert contacts"

    def __str__(self) -> str:
        return f"Alert contacts of {self.customer}"


class AlertRule(models.Model):
    """Which balances are worth an alert, for which wallets.

    Resolution (``evaluation.rule_for_wallet``): an active *customer* rule for
    the wallet's customer wins; otherwise the first active *segment* rule whose
    ``segment_key``/``segment_value`` matches the customer's metadata (the plan
    name is the metadata key ``plan``); otherwise the first active *global*
    rule. "First" = lowest ``priority``, then oldest. Exactly one rule applies.
    """

    class Scope(models.TextChoices):
        GLOBAL = "global", "Global default"
        SEGMENT = "segment", "Customer segment / plan"
        CUSTOMER = "customer", "One customer (override)"

    name = models.CharField(max_length=120)
    scope = models.CharField(max_length=16, choices=Scope.choices, default=Scope.GLOBAL)
    segment_key = models.CharField(max_length=64, blank=True, help_text='Customer metadata key, e.g. "plan".')
    segment_value = models.CharField(max_length=255, blank=True)
    customer = models.ForeignKey(Customer, null=True, blank=True, on_delete=models.CASCADE,
                                 related_name="alert_rules")
    active = models.BooleanField(default=True)
    priority = models.PositiveSmallIntegerField(default=100, help_text="Lower wins among rules of one scope.")
    period_days = models.PositiveSmallIntegerField(
        default=30, help_text="Percent levels are a share of the credits granted in this many past days.")
    hysteresis_percent = models.DecimalField(
        max_digits=5, decimal_places=2, default=Decimal("10"),
        help_text="A triggered level recovers once the balance is this much (percent of its threshold) above it.")
    hysteresis_credits = CreditField(default=Decimal("0"), help_text="… or at least this many credits above it.")
    min_interval = models.DurationField(
        default=timedelta(hours=24), help_text="At most one notice of a kind per channel in this interval.")
    email = models.BooleanField(default=True)
    sms = models.BooleanField(default=False)
    webhook = models.BooleanField(default=True)
    notify_billing_contact = models.BooleanField(default=True)
    notify_technical_contact = models.BooleanField(default=False)
    notify_account_owner = models.BooleanField(default=True)
    notify_finance = models.BooleanField(default=False)
    pause_when_depleted = models.BooleanField(
        default=True, help_text="Pause block wallets at zero available; they resume when credits arrive.")
    expiring_soon_days = models.JSONField(
        default=default_expiring_soon_days, blank=True, validators=[validate_expiring_soon_days],
        help_text="Days before expiry to warn, per grant kind.")
    created_at = models.DateTimeField(default=now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["scope", "priority", "pk"]
        constraints = [
            models.CheckConstraint(
                condition=~Q(scope="customer") | Q(customer__isnull=False), name="alert_rule_customer_scope"),
            models.CheckConstraint(
                condition=~Q(scope="segment") | ~Q(segment_key=""), name="alert_rule_segment_scope"),
            models.UniqueConstraint(fields=["customer"], condition=Q(scope="customer"),
                                    name="alert_rule_one_override_per_customer"),
            models.CheckConstraint(condition=Q(hysteresis_percent__gte=0), name="alert_rule_hysteresis_pct"),
            models.CheckConstraint(condition=Q(hysteresis_credits__gte=0), name="alert_rule_hysteresis_credits"),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.scope == self.Scope.CUSTOMER and self.customer_id is None:
            raise ValidationError({"customer": "A customer rule names its customer."})
        if self.scope == self.Scope.SEGMENT and not self.segment_key:
            raise ValidationError({"segment_key": "A segment rule names the metadata key it matches."})


class AlertLevel(models.Model):
    """One threshold of a rule. A balance level is *breached* when available
    credits are at or below its threshold; a ``days_left`` level when the
    projected days until depletion (7-day average burn) are at or below it."""

    class Kind(models.TextChoices):
        ABSOLUTE = "absolute", "Credits (absolute)"
        PERCENT = "percent", "Percent of credits granted in the period"
        DAYS_LEFT = "days_left", "Days until depletion"

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="levels")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.ABSOLUTE)
    value = CreditField()
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.WARNING)

    class Meta:
        ordering = ["rule", "kind", "-value"]
        constraints = [
            models.CheckConstraint(condition=Q(value__gte=0), name="alert_level_value_not_negative"),
            models.CheckConstraint(condition=~Q(kind="percent") | Q(value__lte=100), name="alert_level_percent_max"),
            models.UniqueConstraint(fields=["rule", "kind", "value"], name="alert_level_unique"),
        ]

    def __str__(self) -> str:
        unit = {"absolute": " credits", "percent": " %", "days_left": " days left"}[self.kind]
        return f"{self.value.normalize():f}{unit} ({self.severity})"


class AlertState(models.Model):
    """Where one level stands for one wallet: armed → triggered → recovered.
    A recovered level is armed again (it triggers on the next breach);
    ``breach_seq`` counts breaches and keys "once per breach"."""

    class Status(models.TextChoices):
        ARMED = "armed", "Armed"
        TRIGGERED = "triggered", "Triggered"
        RECOVERED = "recovered", "Recovered (armed)"

    wallet = models.ForeignKey(Wallet, on_delete=models.CASCADE, related_name="alert_states")
    level = models.ForeignKey(AlertLevel, on_delete=models.CASCADE, related_name="states")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ARMED)
    breach_seq = models.PositiveIntegerField(default=0)
    threshold = CreditField(null=True, blank=True, help_text="Threshold in credits (or days) when last evaluated.")
    available_at_change = CreditField(null=True, blank=True)
    triggered_at = models.DateTimeField(null=True, blank=True)
    recovered_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["wallet", "level"]
        constraints = [models.UniqueConstraint(fields=["wallet", "level"], name="alert_state_unique")]

    def __str__(self) -> str:
        return f"{self.wallet} · {self.level}: {self.status}"


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


class WebhookEndpoint(models.Model):
    """A URL that receives signed Standard Webhooks for the event types it chose."""

    url = models.URLField(max_length=500)
    description = models.CharField(max_length=255, blank=True)
    customer = models.ForeignKey(Customer, null=True, blank=True, on_delete=models.CASCADE,
                                 related_name="webhook_endpoints", help_text="Empty: events of every customer.")
    event_types = models.JSONField(default=list, validators=[validate_event_types])
    secret = models.CharField(max_length=100, default=new_webhook_secret)
    previous_secret = models.CharField(max_length=100, blank=True)
    previous_secret_expires_at = models.DateTimeField(
        null=True, blank=True, help_text="Until then messages are signed with both secrets.")
    enabled = models.BooleanField(default=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    disabled_at = models.DateTimeField(null=True, blank=True)
    disabled_reason = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["url"]

    def __str__(self) -> str:
        return self.url

    def signing_secrets(self, at) -> list[str]:
        keys = [self.secret]
        if self.previous_secret and self.previous_secret_expires_at and self.previous_secret_expires_at > at:
            keys.append(self.previous_secret)
        return keys


class Notification(models.Model):
    """One notice to one recipient on one channel, and its delivery state.
    ``dedupe_key`` is unique: the same breach, expiry or event never sends twice."""

    class Channel(models.TextChoices):
        EMAIL = "email", "Email"
        SMS = "sms", "SMS"
        WEBHOOK = "webhook", "Webhook"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed"
        SUPPRESSED = "suppressed", "Suppressed (frequency limit)"
        CANCELLED = "cancelled", "Cancelled (endpoint disabled)"

    event_type = models.CharField(max_length=40, choices=EventType.choices)
    channel = models.CharField(max_length=16, choices=Channel.choices)
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.INFO)
    customer = models.ForeignKey(Customer, null=True, blank=True, on_delete=models.CASCADE,
                                 related_name="notifications")
    wallet = models.ForeignKey(Wallet, null=True, blank=True, on_delete=models.CASCADE, related_name="notifications")
    rule = models.ForeignKey(AlertRule, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    level = models.ForeignKey(AlertLevel, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    endpoint = models.ForeignKey(WebhookEndpoint, null=True, blank=True, on_delete=models.CASCADE,
                                 related_name="deliveries")
    recipient = models.CharField(max_length=500, help_text="Email address, phone number or webhook URL.")
    audience = models.CharField(max_length=32, blank=True, help_text="billing, technical, account_owner, finance …")
    subject = models.CharField(max_length=255, blank=True)
    payload = models.JSONField(default=dict)
    dedupe_key = models.CharField(max_length=255, unique=True)
    message_id = models.CharField(max_length=64, blank=True, help_text="webhook-id, or the SMS provider's id.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    not_before = models.DateTimeField(null=True, blank=True, help_text="Held for quiet hours until then.")
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="notification_due_idx"),
            models.Index(fields=["wallet", "rule", "channel", "event_type", "created_at"],
                         name="notification_frequency_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} → {self.channel}:{self.recipient} ({self.status})"


class WebhookDelivery(Notification):
    """The webhook notifications, listed apart in the admin."""

    class Meta:
        proxy = True
        verbose_name_plural = "webhook deliveries"


class NotificationAttempt(models.Model):
    """One try at delivering a notification: what the other side answered."""

    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="attempt_log")
    attempted_at = models.DateTimeField(default=now)
    ok = models.BooleanField(default=False)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField(default=0)
    response_excerpt = models.CharField(max_length=500, blank=True)
    error = models.CharField(max_length=500, blank=True)
    retry_in_seconds = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-attempted_at", "-pk"]

    def __str__(self) -> str:
        return f"Attempt on {self.notification_id}: {'ok' if self.ok else 'failed'} {self.status_code or ''}"


class AutoTopUp(models.Model):
    """A wallet that refills itself: below ``threshold``, buy ``pack`` (× quantity)
    or enough packs to reach ``target_balance``, in one purchase."""

    class Mode(models.TextChoices):
        PACK = "pack", "Buy the pack"
        TARGET = "target", "Top up to a target balance"

    wallet = models.OneToOneField(Wallet, on_delete=models.CASCADE, related_name="auto_top_up")
    enabled = models.BooleanField(default=True)
    threshold = CreditField(help_text="Top up when available credits fall to or below this.")
    pack = models.ForeignKey(CreditPack, on_delete=models.PROTECT, related_name="+")
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.PACK)
    pack_quantity = models.PositiveIntegerField(default=1)
    target_balance = CreditField(null=True, blank=True)
    cooldown = models.DurationField(default=timedelta(hours=1))
    require_approval = models.BooleanField(default=False, help_text="The grant waits for finance's approval.")
    await_payment = models.BooleanField(default=False, help_text="The grant waits until payment is recorded.")
    monthly_max_count = models.PositiveIntegerField(null=True, blank=True)
    monthly_max_credits = CreditField(null=True, blank=True)
    max_consecutive_failures = models.PositiveSmallIntegerField(default=3)
    consecutive_failures = models.PositiveSmallIntegerField(default=0)
    disabled_reason = models.CharField(max_length=255, blank=True)
    # Breach tracking, written under the wallet's row lock by the crossing hook.
    armed = models.BooleanField(default=True, editable=False)
    breach_seq = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(default=now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "auto top-up"
        constraints = [
            models.CheckConstraint(condition=Q(threshold__gte=0), name="auto_top_up_threshold_not_negative"),
            models.CheckConstraint(
                condition=~Q(mode="target") | Q(target_balance__isnull=False), name="auto_top_up_target_set"),
        ]

    def __str__(self) -> str:
        return f"Auto top-up of {self.wallet}"

    def clean(self) -> None:
        if self.mode == self.Mode.TARGET:
            if self.target_balance is None:
                raise ValidationError({"target_balance": "Say which balance to top up to."})
            if self.target_balance <= self.threshold:
                raise ValidationError({"target_balance": "The target must be above the threshold."})


class AutoTopUpRun(models.Model):
    """What one breach of an auto top-up's threshold did. One per wallet and breach."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        SUCCEEDED = "succeeded", "Credits added"
        PENDING_APPROVAL = "pending_approval", "Awaiting finance approval"
        AWAITING_PAYMENT = "awaiting_payment", "Awaiting payment"
        PAYMENT_FAILED = "payment_failed", "Payment failed"
        REJECTED = "rejected", "Rejected by finance"
        SKIPPED = "skipped", "Skipped"
        FAILED = "failed", "Failed"

    auto_top_up = models.ForeignKey(AutoTopUp, on_delete=models.CASCADE, related_name="runs")
    wallet = models.ForeignKey(Wallet, on_delete=models.CASCADE, related_name="auto_top_up_runs")
    breach_seq = models.PositiveIntegerField()
    idempotency_key = models.CharField(max_length=255, unique=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    detail = models.CharField(max_length=255, blank=True)
    available_at_breach = CreditField(null=True, blank=True)
    quantity = models.PositiveIntegerField(default=0)
    credits = CreditField(default=Decimal("0"))
    grant = models.ForeignKey(CreditGrant, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    purchase = models.ForeignKey(PackPurchase, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(default=now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name = "auto top-up run"
        constraints = [models.UniqueConstraint(fields=["wallet", "breach_seq"], name="auto_top_up_run_per_breach")]

    def __str__(self) -> str:
        return f"Top-up of {self.wallet_id} for breach {self.breach_seq}: {self.status}"


class PendingTopUpApproval(AutoTopUpRun):
    """Finance's queue: auto top-ups whose grant waits for approval."""

    class Meta:
        proxy = True
        verbose_name = "auto top-up awaiting approval"
        verbose_name_plural = "auto top-ups awaiting approval"
