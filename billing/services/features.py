"""Features and their credit costs (rate card versions).

A cost change is a new ``FeatureCost`` version effective from a moment on;
versions are never edited, so charges already priced keep their price. Each
function runs in one transaction and writes an audit row.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing.errors import Conflict, InvalidRequest
from billing.models import Customer, Feature, FeatureCost
from billing.numbers import round_rate
from billing.services.audit import audit_record


def feature_create(
    *, key: str, name: str, unit: str, credits_per_unit: Decimal, effective_from: datetime | None = None,
    allow_zero_quantity: bool = False, actor=None, actor_label: str = "",
) -> Feature:
    """Create a feature with its first rate card version. Raises Conflict if the key exists.

    The first version starts, by default, at the start of the late-event grace
    window: no usage of a new feature exists yet, so this prices nothing twice,
    and events stamped a little before the feature was created still find a cost."""
    effective_from = effective_from or timezone.now() - timedelta(seconds=settings.CREDITDESK_USAGE_GRACE_SECONDS)
    try:
        with transaction.atomic():
            feature = Feature.objects.create(key=key, name=name, unit=unit, allow_zero_quantity=allow_zero_quantity)
            FeatureCost.objects.create(
                feature=feature, credits_per_unit=_rate(credits_per_unit), effective_from=effective_from,
                created_by=_user(actor), note="Initial rate",
            )
            audit_record(actor=actor, actor_label=actor_label, action="feature.create", obj=feature,
                         changes={"credits_per_unit": credits_per_unit})
    except IntegrityError:
        raise Conflict(f"A feature with key {key!r} exists.", details={"key": key}) from None
    return feature


def feature_cost_create(
    *, feature: Feature, credits_per_unit: Decimal, effective_from: datetime | None = None,
    customer: Customer | None = None, note: str = "", actor=None, actor_label: str = "",
    now: datetime | None = None,
) -> FeatureCost:
    """Add a rate version (for the rate card, or a customer override) effective from
    ``effective_from`` (default now). It may not start in the past (beyond the clock
    skew): usage already priced keeps its price, and late events are priced by the
    version that was in force when they occurred. Raises Conflict if a version
    already starts at that moment."""
    now = now or timezone.now()
    effective_from = effective_from or now
    if effective_from < now - timedelta(seconds=settings.CREDITDESK_CLOCK_SKEW_SECONDS):
        raise InvalidRequest("A new credit cost cannot take effect in the past.",
                             details={"effective_from": "must be now or later"})
    try:
        with transaction.atomic():
            cost = FeatureCost.objects.create(
                feature=feature, customer=customer, credits_per_unit=_rate(credits_per_unit),
                effective_from=effective_from, note=note, created_by=_user(actor),
            )
            audit_record(actor=actor, actor_label=actor_label, action="feature_cost.create", obj=cost,
                         changes={"feature": feature.key, "credits_per_unit": credits_per_unit,
                                  "effective_from": effective_from,
                                  "customer": customer.external_id if customer else None})
    except IntegrityError:
        raise Conflict("A credit cost version already starts at that moment.",
                       details={"effective_from": effective_from.isoformat()}) from None
    return cost


def _rate(value: Decimal) -> Decimal:
    rate = round_rate(value)
    if rate < 0:
        raise InvalidRequest("A credit cost cannot be negative.", details={"credits_per_unit": "must be >= 0"})
    return rate


def _user(actor):
    """A staff user to store as ``created_by`` (API clients are recorded by label only)."""
    return actor if getattr(actor, "is_authenticated", False) and hasattr(actor, "_meta") else None
