"""Input and output serializers of the REST API.

Credits and money are decimal strings on output and accept a string or a JSON
number on input (``DecimalStringField`` → ``billing.numbers.parse_decimal``).
Timestamps are ISO 8601 with an offset, both ways.

The usage endpoints (the hot path) validate with the plain functions in
``billing.api.usage``; their serializers here describe the same shapes for the
OpenAPI schema and are never run per request.
"""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from billing.api.inputs import (
    MAX_ID_LENGTH,
    AwareDateTimeField,
    DecimalStringField,
    StrictIntegerField,
    properties,
)
from billing.errors import InvalidRequest
from billing.models import CreditGrant, validate_currency, validate_timezone
from billing.numbers import MAX_CREDITS, MAX_QUANTITY, MAX_RATE

MAX_MONEY = Decimal("9999999999999999.9999")


def credits_field(**kwargs) -> DecimalStringField:
    return DecimalStringField(places=6, maximum=MAX_CREDITS, **kwargs)


def quantity_field(**kwargs) -> DecimalStringField:
    return DecimalStringField(places=6, maximum=MAX_QUANTITY, allow_zero=True, **kwargs)


def rate_field(**kwargs) -> DecimalStringField:
    return DecimalStringField(places=10, maximum=MAX_RATE, allow_zero=True, **kwargs)


def money_field(**kwargs) -> DecimalStringField:
    """Money as stored (4 decimal places; invoice totals are already rounded to the currency)."""
    return DecimalStringField(places=4, maximum=MAX_MONEY, allow_zero=True, **kwargs)


class StrictCharField(serializers.CharField):
    """A JSON string only (DRF's CharField would turn numbers into strings)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            raise serializers.ValidationError("must be a string")
        return super().to_internal_value(data)


def id_field(**kwargs) -> StrictCharField:
    return StrictCharField(max_length=MAX_ID_LENGTH, **kwargs)


@extend_schema_field({"type": "object", "additionalProperties": True,
                     "description": "Free-form object (team, model, user …), at most 16 KB as JSON."})
class PropertiesField(serializers.JSONField):
    def to_internal_value(self, data):
        try:
            return properties({"properties": data})
        except InvalidRequest as exc:
            raise serializers.ValidationError(exc.details["properties"]) from None


# --- Errors -----------------------------------------------------------------

class ErrorBodySerializer(serializers.Serializer):
    code = serializers.CharField(help_text="invalid_request, unauthorized, forbidden, not_found, "
                                 "insufficient_credits, idempotency_conflict, conflict, rate_limited …")
    message = serializers.CharField()
    details = serializers.DictField(help_text="Validation errors name the offending field here.")


class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()


# --- Customers --------------------------------------------------------------

class CustomerCreateInput(serializers.Serializer):
    external_id = id_field(help_text="The product's own id for this customer.")
    name = StrictCharField(max_length=255)
    email = serializers.EmailField(required=False, allow_blank=True, default="", max_length=254)
    currency = StrictCharField(required=False, default="USD", max_length=3, validators=[validate_currency])
    timezone = StrictCharField(required=False, default="UTC", max_length=64)

    def validate_timezone(self, value: str) -> str:
        # zoneinfo looks names up as files: refuse odd names before asking it.
        if not all(c.isalnum() or c in "/_-+" for c in value):
            raise serializers.ValidationError(f"Unknown time zone: {value!r}")
        try:
            validate_timezone(value)
        except (DjangoValidationError, OSError):
            raise serializers.ValidationError(f"Unknown time zone: {value!r}") from None
        return value


class WalletSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    policy = serializers.CharField()
    credit_limit = credits_field()
    status = serializers.CharField()


class CustomerSerializer(serializers.Serializer):
    external_id = serializers.CharField()
    name = serializers.CharField()
    email = serializers.CharField()
    currency = serializers.CharField()
    timezone = serializers.CharField()
    created_at = AwareDateTimeField()
    wallet = WalletSerializer(help_text="The default wallet.")


# --- Features and costs -----------------------------------------------------

class FeatureCreateInput(serializers.Serializer):
    key = serializers.SlugField(max_length=100)
    name = StrictCharField(max_length=255)
    unit = StrictCharField(max_length=50, required=False, default="unit")
    credits_per_unit = rate_field()
    allow_zero_quantity = serializers.BooleanField(required=False, default=False)
    effective_from = AwareDateTimeField(required=False, help_text="Default: the start of the late-event grace window.")


class FeatureSerializer(serializers.Serializer):
    key = serializers.CharField()
    name = serializers.CharField()
    unit = serializers.CharField()
    credits_per_unit = rate_field(allow_null=True, help_text="The rate card's cost in force now (null: none yet).")
    allow_zero_quantity = serializers.BooleanField()
    active = serializers.BooleanField()


class FeatureCostCreateInput(serializers.Serializer):
    credits_per_unit = rate_field()
    effective_from = AwareDateTimeField(required=False, help_text="Default: now. Never in the past.")
    customer = id_field(required=False, help_text="external_id: makes this a customer-specific override.")
    note = StrictCharField(max_length=255, required=False, default="")


class FeatureCostSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    feature = serializers.CharField(source="feature.key")
    customer = serializers.CharField(source="customer.external_id", allow_null=True, default=None)
    credits_per_unit = rate_field()
    effective_from = AwareDateTimeField()
    note = serializers.CharField()


# --- Balance, ledger, grants ------------------------------------------------

class BalanceGrantSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.CharField()
    remaining = credits_field()
    original = credits_field(source="original_amount")
    priority = serializers.IntegerField()
    effective_at = AwareDateTimeField()
    expires_at = AwareDateTimeField(allow_null=True)
    status = serializers.CharField()
    feature = serializers.CharField(source="feature.key", allow_null=True, default=None,
                                    help_text="Set when only usage of this feature may use the grant.")


class BalanceSerializer(serializers.Serializer):
    customer = serializers.CharField(help_text="external_id")
    available = credits_field()
    ledger_balance = credits_field()
    held = credits_field()
    overage = credits_field()
    by_kind = serializers.DictField(child=credits_field())
    grants = BalanceGrantSerializer(many=True, help_text="Usable grants in consumption order.")
    as_of = AwareDateTimeField()


class LedgerEntrySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    sequence = serializers.IntegerField()
    type = serializers.CharField()
    amount = credits_field()
    balance_after = credits_field()
    grant = serializers.IntegerField(source="grant_id", allow_null=True)
    reference = serializers.CharField()
    memo = serializers.CharField()
    created_at = AwareDateTimeField()


class LedgerPageSerializer(serializers.Serializer):
    results = LedgerEntrySerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True)


class GrantCreateInput(serializers.Serializer):
    amount = credits_field()
    kind = serializers.ChoiceField(choices=[k for k in CreditGrant.Kind.values if k != CreditGrant.Kind.ADJUSTMENT])
    expires_at = AwareDateTimeField(required=False, allow_null=True)
    effective_at = AwareDateTimeField(required=False, allow_null=True)
    priority = StrictIntegerField(required=False, default=50, min_value=0, max_value=100)
    price_paid = DecimalStringField(places=4, maximum=MAX_MONEY, allow_zero=True, required=False,
                                    help_text="Money paid for a prepaid grant, in the customer's currency.")
    reason = StrictCharField(max_length=500, required=False, default="", allow_blank=True)
    feature = StrictCharField(max_length=100, required=False, help_text="Feature key: only its usage may use "
                              "these credits.")


class GrantSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    customer = serializers.CharField(source="wallet.customer.external_id")
    kind = serializers.CharField()
    source = serializers.CharField()
    status = serializers.CharField(help_text="pending_approval until approved in the admin when above the "
                                   "approval threshold.")
    original = credits_field(source="original_amount")
    remaining = credits_field()
    priority = serializers.IntegerField()
    effective_at = AwareDateTimeField()
    expires_at = AwareDateTimeField(allow_null=True)
    price_paid = DecimalStringField(places=4, maximum=MAX_MONEY, allow_zero=True)
    currency = serializers.CharField()
    feature = serializers.CharField(source="feature.key", allow_null=True, default=None)
    reason = serializers.CharField()
    created_at = AwareDateTimeField()


class GrantPageSerializer(serializers.Serializer):
    results = GrantSerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True)


class FeaturePageSerializer(serializers.Serializer):
    results = FeatureSerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True)


class GrantVoidInput(serializers.Serializer):
    reason = StrictCharField(max_length=500, required=False, default="", allow_blank=True)


# --- Usage (schema only; validated by billing.api.usage) --------------------

class UsageEventInput(serializers.Serializer):
    customer = id_field(help_text="The customer's external_id.")
    feature = StrictCharField(max_length=100, help_text="Feature key.")
    quantity = quantity_field(help_text="Decimal string or number, > 0 (0 only where the feature allows it).")
    event_id = id_field(help_text="Your idempotency key for this event, unique per customer.")
    occurred_at = AwareDateTimeField(required=False, help_text="Default: now. Within the grace window.")
    properties = serializers.DictField(required=False, help_text="Free-form object (team, model, user …), "
                                       "at most 16 KB as JSON.")


class UsageCheckInput(serializers.Serializer):
    customer = id_field()
    feature = StrictCharField(max_length=100)
    quantity = quantity_field()
    occurred_at = AwareDateTimeField(required=False)
    properties = serializers.DictField(required=False)


class AllocationSerializer(serializers.Serializer):
    grant = serializers.IntegerField(allow_null=True, help_text="null for the part run into overage.")
    amount = credits_field()
    overage = serializers.BooleanField(required=False)


class UsageBalanceSerializer(serializers.Serializer):
    available = credits_field()
    ledger_balance = credits_field()


class UsageChargeSerializer(serializers.Serializer):
    event_id = serializers.CharField()
    status = serializers.ChoiceField(choices=["charged"])
    credits = credits_field()
    allocations = AllocationSerializer(many=True)
    balance = UsageBalanceSerializer()


class UsageBatchInput(serializers.Serializer):
    events = serializers.ListField(child=UsageEventInput(), min_length=1, max_length=1000,
                                   help_text="1 to 1,000 events, each charged on its own.")


class UsageBatchItemSerializer(serializers.Serializer):
    event_id = serializers.CharField(allow_null=True)
    status = serializers.ChoiceField(choices=["charged", "duplicate", "rejected"])
    credits = credits_field(required=False, help_text="Credits charged (charged, or duplicate of a charged event).")
    error = ErrorBodySerializer(required=False, help_text="Why it was rejected (or why the original was).")


class UsageBatchSerializer(serializers.Serializer):
    results = UsageBatchItemSerializer(many=True, help_text="In input order.")


class UsageCheckSerializer(serializers.Serializer):
    allowed = serializers.BooleanField()
    credits = credits_field()
    available = credits_field()


# --- Reservations -----------------------------------------------------------

class ReservationCreateInput(serializers.Serializer):
    customer = id_field()
    amount = credits_field(required=False, help_text="Credits to hold; or give feature and quantity.")
    feature = StrictCharField(max_length=100, required=False)
    quantity = DecimalStringField(places=6, maximum=MAX_QUANTITY, required=False)
    ttl_seconds = StrictIntegerField(required=False, min_value=1,
                                     max_value=settings.CREDITDESK_MAX_HOLD_TTL_SECONDS,
                                     default=settings.CREDITDESK_DEFAULT_HOLD_TTL_SECONDS)

    def validate(self, attrs):
        by_amount = "amount" in attrs
        by_feature = "feature" in attrs or "quantity" in attrs
        if by_amount == by_feature:
            raise serializers.ValidationError({"amount": "give either amount, or feature and quantity"})
        if by_feature and not ("feature" in attrs and "quantity" in attrs):
            missing = "feature" if "feature" not in attrs else "quantity"
            raise serializers.ValidationError({missing: "required with " + ("quantity" if missing == "feature"
                                                                            else "feature")})
        return attrs


class ReservationSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    customer = serializers.CharField(source="customer.external_id")
    feature = serializers.CharField(source="feature.key", allow_null=True, default=None)
    quantity = DecimalStringField(places=6, maximum=MAX_QUANTITY, allow_null=True)
    held = credits_field(source="amount")
    status = serializers.CharField(help_text="open, captured, released or expired")
    expires_at = AwareDateTimeField()
    created_at = AwareDateTimeField()
    closed_at = AwareDateTimeField(allow_null=True)


class ReservationCaptureInput(serializers.Serializer):
    event_id = id_field(help_text="Idempotency key of the usage charge.")
    quantity = quantity_field(required=False, help_text="Priced by the hold's feature.")
    amount = DecimalStringField(places=6, maximum=MAX_CREDITS, allow_zero=True, required=False,
                                help_text="Credits, as they are.")
    properties = PropertiesField(required=False, default=dict)

    def validate(self, attrs):
        if ("quantity" in attrs) == ("amount" in attrs):
            raise serializers.ValidationError({"quantity": "give either quantity or amount"})
        return attrs
