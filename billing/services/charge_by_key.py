"""One usage event charged by the customer's external id and the feature's key, in one
round trip: the API's ordinary ``POST /usage``.

``creditdesk_usage_charge_by_key`` (migration 0022) resolves the customer's default
wallet and the active feature in the same statement as the charge, so the answer
never rests on a cached resolution and costs one statement. It decides exactly as
``usage_charge`` does on its one-statement path; whatever it does not decide itself
(an unknown customer or feature, a zero quantity refused, no credit cost then, a
decision left to the Python engine: a balance-crossing hook, a limited team, a
product Python would round) comes back as None having written nothing, and the
caller takes the ordinary path, which words every refusal.
"""

from __future__ import annotations

import decimal
import json
from datetime import datetime
from decimal import Decimal

from django.utils import timezone

from billing import prepared
from billing.services import usage
from billing.services.usage import ChargeResult, database_outcome, request_hash

_SQL = ("SELECT * FROM creditdesk_usage_charge_by_key(%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s)")


class _Key:
    __slots__ = ("external_id", "key")

    def __init__(self, value: str):
        self.external_id = self.key = value


class _Payload:
    """What ``request_hash`` reads of a charge request."""

    __slots__ = ("customer", "feature", "quantity", "occurred_at", "properties", "reservation_id")

    def __init__(self, customer: str, feature: str, quantity: Decimal, occurred_at, properties: dict):
        self.customer, self.feature = _Key(customer), _Key(feature)
        self.quantity, self.occurred_at, self.properties = quantity, occurred_at, properties
        self.reservation_id = None


def usage_charge_by_key(*, customer: str, feature: str, quantity: Decimal, event_id: str,
                        occurred_at: datetime | None, properties: dict, now: datetime) -> ChargeResult | None:
    """Charge one event (no reservation) named by keys: its ``ChargeResult`` — charged,
    rejected, paused, a replay or a conflict, with the bodies ``usage_charge`` gives — or
    None, having written nothing, when the caller must take the ordinary path. The
    caller has validated the body and, if ``occurred_at`` is given, its window."""
    if not usage.FAST_PATH or not isinstance(quantity, Decimal) or not quantity.is_finite():
        return None
    if occurred_at is not None and timezone.is_naive(occurred_at):
        return None
    # Hashed before occurred_at defaults to now: an omitted occurred_at is part of the payload.
    hash_ = request_hash(_Payload(customer, feature, quantity, occurred_at, properties))
    row = prepared.fetch(_SQL, (customer, feature, event_id, quantity, occurred_at or now, json.dumps(properties),
                                hash_, now, timezone.now(), decimal.getcontext().prec))
    if row[0] != "ok":
        return None
    return database_outcome(event_id, *row[4:])
