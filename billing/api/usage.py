"""Usage: charge one event, a batch, or check without charging.

This is the hot path, so it is plain functions, not serializers: one query
resolves the customer, its default wallet and the feature; the charge itself is
``billing.services.usage`` (one set-based engine). The single-event answer is
the engine's ``ChargeResult`` status and body as they are, so a replay of an
``event_id`` returns exactly the first answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import lru_cache

from django.db import DEFAULT_DB_ALIAS
from django.db.models import Sum
from django.db.models.signals import post_delete, post_save
from django.utils import timezone
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework.response import Response

from billing import prepared
from billing.api import inputs
from billing.api.base import BALANCE_READ, USAGE_WRITE, ApiView, active_feature, customer_wallet, errors
from billing.api.serializers import (
    ErrorSerializer,
    UsageBatchInput,
    UsageBatchSerializer,
    UsageChargeSerializer,
    UsageCheckInput,
    UsageCheckSerializer,
    UsageEventInput,
)
from billing.errors import BillingError, InvalidRequest, NotFound
from billing.models import CreditGrant, Customer, Feature, FeatureCost, Wallet
from billing.numbers import MAX_QUANTITY, ZERO, parse_decimal, round_credits
from billing.services.charge_by_key import usage_charge_by_key
from billing.services.ledger import headroom, open_holds_total
from billing.services.team_limits import team_limit_left
from billing.services.usage import (
    ChargeRequest,
    ChargeResult,
    check_occurred_at,
    usage_charge,
    usage_charge_many,
)

MAX_BATCH = 1000


@dataclass
class UsageInput:
    customer: str
    feature: str
    quantity: Decimal
    event_id: str | None
    occurred_at: datetime | None
    properties: dict


@lru_cache(maxsize=4096)
def _quantity_of(value: str) -> Decimal:
    """A quantity sent as a string, parsed once per distinct string (a batch repeats them)."""
    return parse_decimal(value, places=6, maximum=MAX_QUANTITY, allow_zero=True)


def _quantity(data: dict) -> Decimal:
    value = data.get("quantity")
    if type(value) is str:
        try:
            return _quantity_of(value)
        except ValueError:
            pass  # the same refusal, worded by inputs.decimal below
    return inputs.decimal(data, "quantity", places=6, maximum=MAX_QUANTITY, allow_zero=True)


def parse_usage(data, *, with_event_id: bool) -> UsageInput:
    """Validate one usage body; raises InvalidRequest naming the first bad field."""
    if with_event_id and type(data) is dict and data.get("occurred_at") is None and data.get("properties") is None:
        # The common body (a batch has 1,000): text fields that ``inputs.text`` accepts, checked the
        # quick way (ASCII without NUL, 1 to MAX_ID_LENGTH), so quantity is the only one left to refuse.
        customer, feature, event_id = data.get("customer"), data.get("feature"), data.get("event_id")
        if (type(customer) is str and type(feature) is str and type(event_id) is str
                and 0 < len(customer) <= inputs.MAX_ID_LENGTH and 0 < len(feature) <= inputs.MAX_ID_LENGTH
                and 0 < len(event_id) <= inputs.MAX_ID_LENGTH
                and (texts := customer + feature + event_id).isascii() and "\x00" not in texts):
            return UsageInput(customer=customer, feature=feature, quantity=_quantity(data), event_id=event_id,
                              occurred_at=None, properties={})
    data = inputs.body_object(data)
    return UsageInput(
        customer=inputs.text(data, "customer"),
        feature=inputs.text(data, "feature"),
        quantity=_quantity(data),
        event_id=inputs.text(data, "event_id") if with_event_id else None,
        occurred_at=inputs.optional_timestamp(data, "occurred_at"),
        properties=inputs.properties(data),
    )


_RESOLVE_SQL = f"""
    SELECT w.id, c.id, c.external_id, c.name, c.currency, c.timezone, f.id, f.allow_zero_quantity
    FROM {Customer._meta.db_table} c
    JOIN {Wallet._meta.db_table} w ON w.customer_id = c.id AND w.is_default
    LEFT JOIN {Feature._meta.db_table} f ON f.key = %s AND f.active
    WHERE c.external_id = %s
"""
_CUSTOMER_FIELDS = ["id", "external_id", "name", "currency", "timezone"]


@dataclass
class Resolved:
    customer: Customer
    wallet_id: int
    feature: Feature


# (customer external_id, feature key) -> (expires at, row of _RESOLVE_SQL). Only rows
# that resolved both are kept, for RESOLVE_CACHE_SECONDS: a customer's default
# wallet or a feature's active flag changed in another process is seen within
# that; a change saved in this process clears the cache at once (signals below).
RESOLVE_CACHE_SECONDS = 5.0
_RESOLVE_CACHE_MAX = 20_000
_resolved: dict[tuple[str, str], tuple[float, tuple]] = {}


def resolve_cache_clear(**_kwargs) -> None:
    _resolved.clear()


for _model in (Customer, Wallet, Feature):
    post_save.connect(resolve_cache_clear, sender=_model, dispatch_uid=f"usage-resolve-{_model.__name__}")
    post_delete.connect(resolve_cache_clear, sender=_model, dispatch_uid=f"usage-resolve-del-{_model.__name__}")


def resolve(customer: str, feature_key: str) -> Resolved:
    """The customer, its default wallet and the active feature, in one statement
    (the hot path: no ORM query compilation), cached briefly in-process (see
    ``RESOLVE_CACHE_SECONDS``; a miss is never cached). 404 naming whichever is unknown."""
    clock = time.monotonic()
    cached = _resolved.get((customer, feature_key))
    if cached is not None and cached[0] > clock:
        row = cached[1]
    else:
        row = prepared.fetch(_RESOLVE_SQL, (feature_key, customer))
        if row is not None and row[6] is not None:
            if len(_resolved) >= _RESOLVE_CACHE_MAX:
                _resolved.clear()
            _resolved[(customer, feature_key)] = (clock + RESOLVE_CACHE_SECONDS, row)
    if row is None:
        raise NotFound(f"No customer with external_id {customer!r}."[:300], details={"customer": "not found"})
    if row[6] is None:
        raise NotFound(f"No active feature with key {feature_key!r}."[:300], details={"feature": "not found"})
    # The engine needs only the feature's pk and key and these customer fields.
    return Resolved(
        customer=Customer.from_db(DEFAULT_DB_ALIAS, _CUSTOMER_FIELDS, row[1:6]),
        wallet_id=row[0],
        feature=Feature.from_db(DEFAULT_DB_ALIAS, ["id", "key", "allow_zero_quantity"], [row[6], feature_key, row[7]]),
    )


def check_event(event: UsageInput, feature: Feature, now: datetime) -> None:
    if event.quantity == 0 and not feature.allow_zero_quantity:
        raise InvalidRequest("quantity must be greater than zero for this feature.",
                             details={"quantity": "must be greater than zero"})
    if event.occurred_at is not None:
        check_occurred_at(event.occurred_at, now)


def charge_request(event: UsageInput, customer: Customer, wallet_id: int, feature: Feature) -> ChargeRequest:
    return ChargeRequest(
        customer=customer, wallet_id=wallet_id, feature=feature, quantity=event.quantity,
        event_id=event.event_id, occurred_at=event.occurred_at, properties=event.properties,
    )


_CHARGE_RESPONSES = {
    201: UsageChargeSerializer,
    400: OpenApiResponse(ErrorSerializer, description="Invalid request (details name the field), occurred_at "
                         "outside the grace window or clock skew, or no credit cost then"),
    402: OpenApiResponse(ErrorSerializer, description="Does not fit a block wallet: nothing charged; details "
                         "carry required and available"),
    404: OpenApiResponse(ErrorSerializer, description="Unknown customer or feature"),
    409: OpenApiResponse(ErrorSerializer, description="idempotency_conflict: event_id seen with another payload"),
}


class UsageChargeApi(ApiView):
    """Charge one usage event (scope ``usage:write``). A replay of the same
    ``event_id`` (per customer) returns the first status and body; the same id
    with a different payload is a 409 ``idempotency_conflict``."""

    scopes = {"POST": (USAGE_WRITE,)}

    @extend_schema(
        operation_id="usage_charge", request=UsageEventInput,
        responses={**errors(), **_CHARGE_RESPONSES},
        examples=[OpenApiExample("Charge", request_only=True, value={
            "customer": "acme", "feature": "api-call", "quantity": "3", "event_id": "evt_123"})],
    )
    def post(self, request):
        status, body = charge_one(request.data)
        return Response(body, status=status)


def charge_one(data) -> tuple[int, dict]:
    """POST /usage for a parsed body: (status, body); raises BillingError for a refusal."""
    now = timezone.now()
    event = parse_usage(data, with_event_id=True)
    if event.occurred_at is None or _in_window(event.occurred_at, now):
        # The ordinary event: resolved and charged in one statement; what it leaves, the path below answers.
        result = usage_charge_by_key(customer=event.customer, feature=event.feature, quantity=event.quantity,
                                     event_id=event.event_id, occurred_at=event.occurred_at,
                                     properties=event.properties, now=now)
        if result is not None:
            return result.http_status, result.body
    found = resolve(event.customer, event.feature)
    check_event(event, found.feature, now)
    result = usage_charge(charge_request(event, found.customer, found.wallet_id, found.feature), now=now)
    return result.http_status, result.body


def _in_window(occurred_at: datetime, now: datetime) -> bool:
    try:
        check_occurred_at(occurred_at, now)
    except InvalidRequest:
        return False
    return True


def _rejected(event_id: str | None, error: dict) -> dict:
    return {"event_id": event_id, "status": "rejected", "error": error}


def _batch_item(result: ChargeResult) -> dict:
    if result.status == "charged":
        return {"event_id": result.event_id, "status": "charged", "credits": str(result.credits)}
    if result.status == "duplicate":
        item = {"event_id": result.event_id, "status": "duplicate"}
        if result.http_status == 201:
            item["credits"] = str(result.credits)
        else:
            item["error"] = result.error
        return item
    return _rejected(result.event_id, result.error or result.body.get("error"))


class UsageBatchApi(ApiView):
    """Charge up to 1,000 events (scope ``usage:write``). Each event is validated
    and charged on its own: a malformed one comes back ``rejected`` with an
    ``error``, the others still charge. Results are in input order."""

    scopes = {"POST": (USAGE_WRITE,)}

    @extend_schema(operation_id="usage_batch", request=UsageBatchInput,
                   responses={200: UsageBatchSerializer, **errors(400)})
    def post(self, request):
        status, body = charge_batch(request.data)
        return Response(body, status=status)


def charge_batch(data) -> tuple[int, dict]:
    """POST /usage/batch for a parsed body: (200, results); raises BillingError for a bad envelope.

    Each event is refused (a ``rejected`` item) for exactly what ``parse_usage``, ``resolve``
    and ``check_event`` refuse in a single charge; the others are charged together
    (``usage_charge_many``). Results are in input order.

    A batch repeats a few payloads under many event ids, so a plain event (exactly the
    keys customer, feature, quantity and event_id, all strings) whose customer, feature
    and quantity texts ``parse_usage`` already accepted in this batch is not parsed again:
    only its event id is checked (as ``parse_usage`` does: 1 to MAX_ID_LENGTH characters,
    here ASCII without NUL; any other goes through ``parse_usage``), and it is resolved
    and checked once with the first of its kind."""
    now = timezone.now()
    body = inputs.body_object(data)
    events = body.get("events")
    if not isinstance(events, list) or not 1 <= len(events) <= MAX_BATCH:
        raise InvalidRequest(f"events must be a list of 1 to {MAX_BATCH} usage events.",
                             details={"events": f"must be a list of 1 to {MAX_BATCH} events"})
    items: list[dict | None] = [None] * len(events)
    plain: dict[tuple[str, str, str], UsageInput] = {}  # (customer, feature, quantity text) -> first parse
    # Per event to charge: (index, its parse, None) or, for a repeat of a plain one, (index, key, event id).
    entries: list[tuple[int, UsageInput | tuple[str, str, str], str | None]] = []
    for index, raw in enumerate(events):
        if type(raw) is dict and len(raw) == 4:
            customer, feature, quantity, event_id = (raw.get("customer"), raw.get("feature"), raw.get("quantity"),
                                                     raw.get("event_id"))
            if (type(customer) is str and type(feature) is str and type(quantity) is str and type(event_id) is str
                    and (key := (customer, feature, quantity)) in plain
                    and 0 < len(event_id) <= inputs.MAX_ID_LENGTH and event_id.isascii() and "\x00" not in event_id):
                entries.append((index, key, event_id))
                continue
        try:
            event = parse_usage(raw, with_event_id=True)
        except InvalidRequest as exc:
            items[index] = _rejected(_event_id_of(raw), exc.as_envelope()["error"])
            continue
        if event.occurred_at is None and not event.properties and type(quantity := raw.get("quantity")) is str:
            plain.setdefault((event.customer, event.feature, quantity), event)
        entries.append((index, event, None))

    found = _resolve_many({(e.customer, e.feature) for _, e, event_id in entries if event_id is None})
    checked: dict[tuple[str, str, str], Resolved | BillingError] = {}
    requests: list[ChargeRequest] = []
    positions: list[int] = []
    for index, what, event_id in entries:
        if event_id is None:
            event_id, target = what.event_id, _target(found, what, now)
            quantity, occurred_at, properties = what.quantity, what.occurred_at, what.properties
        else:
            target = checked.get(what)
            if target is None:
                target = checked[what] = _target(found, plain[what], now)
            quantity, occurred_at, properties = plain[what].quantity, None, {}
        if type(target) is not Resolved:
            items[index] = _rejected(event_id, target.as_envelope()["error"])
            continue
        requests.append(ChargeRequest(
            customer=target.customer, wallet_id=target.wallet_id, feature=target.feature, quantity=quantity,
            event_id=event_id, occurred_at=occurred_at, properties=properties))
        positions.append(index)

    for index, result in zip(positions, usage_charge_many(requests, now=now), strict=True):
        items[index] = _batch_item(result)
    return 200, {"results": items}


def _target(found: dict, event: UsageInput, now: datetime) -> Resolved | BillingError:
    """The event's customer, wallet and feature (``found``, from ``_resolve_many``), or the
    refusal ``resolve`` or ``check_event`` raises for it."""
    target = found[(event.customer, event.feature)]
    if type(target) is not Resolved:
        return target
    try:
        check_event(event, target.feature, now)
    except InvalidRequest as exc:
        return exc
    return target


_RESOLVE_MANY_SQL = f"""
    SELECT k.c, k.f, w.id, c.id, c.external_id, c.name, c.currency, c.timezone, f.id, f.allow_zero_quantity
    FROM unnest(%s::text[], %s::text[]) AS k(c, f)
    JOIN {Customer._meta.db_table} c ON c.external_id = k.c
    JOIN {Wallet._meta.db_table} w ON w.customer_id = c.id AND w.is_default
    LEFT JOIN {Feature._meta.db_table} f ON f.key = k.f AND f.active
"""


def _resolve_many(pairs: set[tuple[str, str]]) -> dict[tuple[str, str], Resolved | NotFound]:
    """``resolve``'s answer for each (customer, feature key) (a NotFound instead of raising
    it), read fresh in one statement for them all: a batch sees a feature deactivated or a
    default wallet moved as its first event would (no cached resolution)."""
    rows: dict[tuple[str, str], tuple | None] = dict.fromkeys(pairs)
    if pairs:
        for row in prepared.fetch(_RESOLVE_MANY_SQL, ([c for c, _ in pairs], [f for _, f in pairs]),
                                  all_rows=True):
            rows[(row[0], row[1])] = row[2:]
    customers: dict[int, Customer] = {}
    features: dict[int, Feature] = {}
    found: dict[tuple[str, str], Resolved | NotFound] = {}
    for (customer, feature_key), row in rows.items():
        if row is None:
            found[(customer, feature_key)] = NotFound(f"No customer with external_id {customer!r}."[:300],
                                                      details={"customer": "not found"})
        elif row[6] is None:
            found[(customer, feature_key)] = NotFound(f"No active feature with key {feature_key!r}."[:300],
                                                      details={"feature": "not found"})
        else:
            if row[1] not in customers:
                customers[row[1]] = Customer.from_db(DEFAULT_DB_ALIAS, _CUSTOMER_FIELDS, row[1:6])
            if row[6] not in features:
                features[row[6]] = Feature.from_db(DEFAULT_DB_ALIAS, ["id", "key", "allow_zero_quantity"],
                                                   [row[6], feature_key, row[7]])
            found[(customer, feature_key)] = Resolved(customer=customers[row[1]], wallet_id=row[0],
                                                      feature=features[row[6]])
    return found


def _event_id_of(raw) -> str | None:
    value = raw.get("event_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and len(value) <= inputs.MAX_ID_LENGTH and inputs.storable(value) else None


class UsageCheckApi(ApiView):
    """Would this usage be allowed now? Prices it like a charge (same body without
    ``event_id``) and compares with the available balance and, for a team with a
    spending limit, with what the team has left this month; charges nothing
    (scope ``usage:write`` or ``balance:read``: it only reads)."""

    scopes = {"POST": (USAGE_WRITE, BALANCE_READ)}

    @extend_schema(operation_id="usage_check", request=UsageCheckInput,
                   responses={200: UsageCheckSerializer, **errors(400, 404)})
    def post(self, request):
        now = timezone.now()
        event = parse_usage(request.data, with_event_id=False)
        wallet = customer_wallet(event.customer)
        feature = active_feature(event.feature)
        check_event(event, feature, now)
        at = event.occurred_at or now
        rate = FeatureCost.objects.effective(feature_id=feature.pk, at=at, customer_id=wallet.customer_id)
        if rate is None:
            raise InvalidRequest(f"Feature {feature.key!r} has no credit cost effective at {at.isoformat()}.",
                                 details={"occurred_at": "no credit cost is effective at this time"})
        credits = round_credits(event.quantity * rate.credits_per_unit)
        if wallet.status == Wallet.Status.PAUSED:
            available = ZERO
        else:
            usable = CreditGrant.objects.filter(wallet_id=wallet.pk).usable(at=now, feature_id=feature.pk).aggregate(
                total=Sum("remaining"))["total"] or ZERO
            available = max(usable - open_holds_total(wallet, at=now) + headroom(wallet), ZERO)
        left = team_limit_left(wallet=wallet, properties=event.properties, at=now)
        allowed = credits <= available and (left is None or credits <= left)
        return Response({"allowed": allowed, "credits": str(credits), "available": str(round_credits(available))})
