"""THE TEST ORACLE: billing/services/usage.py as of commit dc168f7 (the ORM engine
before the fast paths), plus the later fix that shows an empty wallet's available
as "0.000000". test_hot_path.py checks the current engine against it. Do not
change it to follow the engine: it is what "the same results as before" means.

Real-time usage charging: one engine for single events, batches and captures.

``usage_charge_many`` prices and charges a list of events in one transaction
with set-wise queries, so a batch of 1,000 events costs a handful of round
trips; ``usage_charge`` is the same engine with one event. Guarantees:

- each event id has at most one effect per customer (advisory lock per
  (customer, event id), then a look-up): a replay returns the first stored
  answer, a different payload under the same id is an ``idempotency_conflict``;
- credits = quantity × the credit cost effective at ``occurred_at`` (customer
  override first, then the rate card), rounded once; the rate version is kept;
- only grants usable *now* are consumed, in DESIGN.md §3 order, one ledger
  entry per grant touched; overdraft wallets run into overage up to their limit;
- a ``block`` wallet never goes below zero available (grants then wallets are
  locked, in primary-key order, before anything is decided);
- each event is all-or-nothing: one that does not fit is stored as
  ``rejected`` and charges nothing, the others in the batch still charge.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from billing import events
from billing.errors import InvalidRequest
from billing.models import (
    CreditGrant,
    Customer,
    Feature,
    FeatureCost,
    LedgerEntry,
    Reservation,
    UsageEvent,
    Wallet,
)
from billing.numbers import ZERO, round_credits
from billing.services.ledger import Movement, append_entries

OK_STATUS = {UsageEvent.Status.CHARGED: 201, UsageEvent.Status.REJECTED: 402}


@dataclass
class ChargeRequest:
    customer: Customer
    wallet_id: int
    feature: Feature
    quantity: Decimal
    event_id: str
    occurred_at: datetime | None = None
    properties: dict = field(default_factory=dict)
    reservation_id: int | None = None


@dataclass
class ChargeResult:
    """``status`` is charged, rejected, duplicate (replay) or conflict."""

    event_id: str
    status: str
    http_status: int
    body: dict
    credits: Decimal | None = None
    error: dict | None = None


def request_hash(request: ChargeRequest) -> str:
    canonical = json.dumps(
        {
            "customer": request.customer.external_id,
            "feature": request.feature.key,
            "quantity": str(request.quantity.normalize()),
            "occurred_at": request.occurred_at.isoformat() if request.occurred_at else None,
            "properties": request.properties,
            "reservation": request.reservation_id,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_occurred_at(occurred_at: datetime, now: datetime) -> None:
    if occurred_at < now - timedelta(seconds=settings.CREDITDESK_USAGE_GRACE_SECONDS):
        raise InvalidRequest(
            "occurred_at is older than the grace window for late events.",
            details={"occurred_at": f"must be within {settings.CREDITDESK_USAGE_GRACE_SECONDS} seconds of now"},
        )
    if occurred_at > now + timedelta(seconds=settings.CREDITDESK_CLOCK_SKEW_SECONDS):
        raise InvalidRequest(
            "occurred_at is in the future.",
            details={"occurred_at": f"must not be more than {settings.CREDITDESK_CLOCK_SKEW_SECONDS} seconds ahead"},
        )


def _rates_for(requests: list[ChargeRequest]) -> dict[tuple[int, int | None], list[FeatureCost]]:
    """Every rate version of the features involved, newest first, keyed by (feature, customer|None)."""
    feature_ids = {r.feature.pk for r in requests}
    customer_ids = {r.customer.pk for r in requests}
    latest = max(r.occurred_at for r in requests)
    rows = FeatureCost.objects.filter(feature_id__in=feature_ids, effective_from__lte=latest).filter(
        Q(customer__isnull=True) | Q(customer_id__in=customer_ids)
    ).order_by("-effective_from", "-pk")
    table: dict[tuple[int, int | None], list[FeatureCost]] = defaultdict(list)
    for row in rows:
        table[(row.feature_id, row.customer_id)].append(row)
    return table


def _pick_rate(table, request: ChargeRequest) -> FeatureCost | None:
    for key in ((request.feature.pk, request.customer.pk), (request.feature.pk, None)):
        for version in table.get(key, ()):
            if version.effective_from <= request.occurred_at:
                return version
    return None


def _lock_event_ids(requests: list[ChargeRequest]) -> None:
    keys = sorted({(r.customer.pk, r.event_id) for r in requests})
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_advisory_xact_lock(c, hashtext(e))) FROM unnest(%s::int[], %s::text[]) AS k(c, e)",
            [[k[0] for k in keys], [k[1] for k in keys]],
        )


def _rejection(code: str, message: str, details: dict) -> dict:
    return {"error": {"code": code, "message": message, "details": details}}


def usage_charge(request: ChargeRequest, *, now: datetime | None = None) -> ChargeResult:
    """Charge one usage event (see the module docstring for the guarantees)."""
    return usage_charge_many([request], now=now)[0]


def usage_charge_many(requests: list[ChargeRequest], *, now: datetime | None = None) -> list[ChargeResult]:
    """Charge events in input order, each all-or-nothing, in one transaction.

    Raises InvalidRequest only for an event whose occurred_at is outside the
    window or whose feature has no cost then (single-event callers); batch
    callers validate first and get such events back as rejected results.
    """
    now = now or timezone.now()
    if not requests:
        return []
    hashes = [request_hash(r) for r in requests]  # before defaulting: an omitted occurred_at is part of the payload
    for request in requests:
        request.occurred_at = request.occurred_at or now
    results: list[ChargeResult | None] = [None] * len(requests)

    with transaction.atomic():
        _lock_event_ids(requests)
        existing = _existing_events(requests)
        rates = _rates_for(requests)
        seen: dict[tuple[int, str], int] = {}
        todo: list[int] = []
        for i, request in enumerate(requests):
            key = (request.customer.pk, request.event_id)
            prior = existing.get(key)
            if prior is None and key in seen:
                prior_index = seen[key]
                if hashes[prior_index] != hashes[i]:
                    results[i] = _conflict(request.event_id)
                else:
                    results[i] = ("same-batch", prior_index)  # resolved after the first one is decided
                continue
            if prior is not None:
                results[i] = _replay(prior, hashes[i], request.event_id)
                continue
            seen[key] = i
            rate = _pick_rate(rates, request)
            if rate is None:
                results[i] = _invalid(
                    request.event_id,
                    f"Feature {request.feature.key!r} has no credit cost effective at {request.occurred_at.isoformat()}.",
                    {"occurred_at": "no credit cost is effective at this time"},
                )
                continue
            todo.append(i)
            request._rate = rate  # type: ignore[attr-defined]

        if todo:
            _charge(requests, hashes, todo, results, now)

        for i, result in enumerate(results):
            if isinstance(result, tuple):
                first = results[result[1]]
                results[i] = ChargeResult(
                    event_id=requests[i].event_id, status="duplicate", http_status=first.http_status,
                    body=first.body, credits=first.credits, error=first.error,
                )
    return results  # type: ignore[return-value]


def _existing_events(requests: list[ChargeRequest]) -> dict[tuple[int, str], UsageEvent]:
    by_customer: dict[int, set[str]] = defaultdict(set)
    for r in requests:
        by_customer[r.customer.pk].add(r.event_id)
    condition = Q()
    for customer_id, ids in by_customer.items():
        condition |= Q(customer_id=customer_id, event_id__in=ids)
    rows = UsageEvent.objects.filter(condition).only("customer_id", "event_id", "status", "request_hash",
                                                     "response", "credits")
    return {(row.customer_id, row.event_id): row for row in rows}


def _replay(prior: UsageEvent, hash_: str, event_id: str) -> ChargeResult:
    if prior.request_hash != hash_:
        return _conflict(event_id)
    return ChargeResult(
        event_id=event_id, status="duplicate", http_status=OK_STATUS[prior.status], body=prior.response,
        credits=prior.credits, error=prior.response.get("error"),
    )


def _conflict(event_id: str) -> ChargeResult:
    body = _rejection("idempotency_conflict", f"Event {event_id!r} was already received with a different payload.",
                      {"event_id": event_id})
    return ChargeResult(event_id=event_id, status="conflict", http_status=409, body=body, error=body["error"])


def _invalid(event_id: str, message: str, details: dict) -> ChargeResult:
    body = _rejection("invalid_request", message, details)
    return ChargeResult(event_id=event_id, status="invalid", http_status=400, body=body, error=body["error"])


def _charge(requests, hashes, todo, results, now) -> None:
    wallet_ids = sorted({requests[i].wallet_id for i in todo})
    grant_rows = list(
        CreditGrant.objects.select_for_update(of=("self",))
        .filter(wallet_id__in=wallet_ids, status=CreditGrant.Status.ACTIVE, effective_at__lte=now, remaining__gt=0)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .order_by("pk")
    )
    wallets = {w.pk: w for w in Wallet.objects.select_for_update(of=("self",)).filter(pk__in=wallet_ids).order_by("pk")}
    reservation_ids = sorted({requests[i].reservation_id for i in todo if requests[i].reservation_id})
    reservations = (
        {r.pk: r for r in Reservation.objects.select_for_update(of=("self",)).filter(pk__in=reservation_ids).order_by("pk")}
        if reservation_ids else {}
    )
    held = dict(
        Reservation.objects.filter(wallet_id__in=wallet_ids, status=Reservation.Status.OPEN, expires_at__gt=now)
        .values_list("wallet_id").annotate(total=Sum("amount")).values_list("wallet_id", "total")
    )

    grants_by_wallet: dict[int, list[CreditGrant]] = defaultdict(list)
    for grant in sorted(grant_rows, key=_consumption_key):
        grants_by_wallet[grant.wallet_id].append(grant)

    new_events: list[UsageEvent] = []
    movements_by_wallet: dict[int, list[tuple[int, Movement]]] = defaultdict(list)
    overage_by_wallet: dict[int, Decimal] = defaultdict(lambda: ZERO)
    touched: dict[int, CreditGrant] = {}
    first_available: dict[int, Decimal] = {}
    last_available: dict[int, Decimal] = {}

    for i in todo:
        request = requests[i]
        rate: FeatureCost = request._rate
        wallet = wallets[request.wallet_id]
        credits = round_credits(request.quantity * rate.credits_per_unit)
        usable = [g for g in grants_by_wallet[wallet.pk] if g.remaining > 0 and g.feature_id in (None, request.feature.pk)]
        reservation = reservations.get(request.reservation_id) if request.reservation_id else None
        if request.reservation_id and (reservation is None or not reservation.is_open(now)
                                       or reservation.wallet_id != wallet.pk):
            body = _rejection("conflict", "The reservation is no longer open (captured, released or expired).",
                              {"reservation": request.reservation_id})
            results[i] = ChargeResult(event_id=request.event_id, status="conflict", http_status=409, body=body,
                                      error=body["error"])
            continue
        wallet_held = held.get(wallet.pk, ZERO)
        if reservation is not None and reservation.status == Reservation.Status.OPEN:
            wallet_held -= reservation.amount
        usable_total = sum((g.remaining for g in usable), ZERO)
        borrow = max(wallet.credit_limit - wallet.overage - overage_by_wallet[wallet.pk], ZERO) if (
            wallet.policy == Wallet.Policy.OVERDRAFT) else ZERO
        available = usable_total - wallet_held + borrow
        first_available.setdefault(wallet.pk, available)
        if wallet.status == Wallet.Status.PAUSED:
            body = _rejection("insufficient_credits", "The wallet is paused until credits arrive.",
                              {"required": str(credits), "available": "0.000000", "reason": "wallet_paused",
                               "paused_reason": wallet.paused_reason, "event_id": request.event_id})
            results[i] = ChargeResult(event_id=request.event_id, status="rejected", http_status=402, body=body,
                                      credits=credits, error=body["error"])
            continue
        event = UsageEvent(
            customer=request.customer, wallet_id=wallet.pk, feature=request.feature, event_id=request.event_id,
            quantity=request.quantity, occurred_at=request.occurred_at, properties=request.properties,
            rate=rate, credits_per_unit=rate.credits_per_unit, credits=credits, request_hash=hashes[i],
            reservation_id=request.reservation_id, created_at=now,
        )
        if credits > available:
            event.status = UsageEvent.Status.REJECTED
            body = _rejection("insufficient_credits",
                              f"The wallet has {round_credits(max(available, ZERO))} credits available; this event needs {credits}.",
                              {"required": str(credits), "available": str(round_credits(max(available, ZERO))),
                               "event_id": request.event_id})
            event.response = body
            results[i] = ChargeResult(event_id=request.event_id, status="rejected", http_status=402, body=body,
                                      credits=credits, error=body["error"])
            new_events.append(event)
            continue

        # Consume grants in consumption order; never more than usable-minus-held of grant credits.
        grant_budget = max(usable_total - wallet_held, ZERO)
        left = min(credits, grant_budget)
        allocations = []
        for grant in usable:
            if left <= 0:
                break
            take = min(grant.remaining, left)
            grant.remaining -= take
            left -= take
            touched[grant.pk] = grant
            allocations.append((grant, take))
        over = credits - sum((take for _, take in allocations), ZERO)
        if over > 0:
            overage_by_wallet[wallet.pk] += over
        if reservation is not None:
            reservation.status = Reservation.Status.CAPTURED
            reservation.closed_at = now
            held[wallet.pk] = held.get(wallet.pk, ZERO) - reservation.amount
        for grant, take in allocations:
            movements_by_wallet[wallet.pk].append(
                (len(new_events), Movement(type=LedgerEntry.Type.USAGE, amount=-take, grant=grant,
                                           reference=f"usage:{request.event_id}"[:255]))
            )
        if over > 0:
            movements_by_wallet[wallet.pk].append(
                (len(new_events), Movement(type=LedgerEntry.Type.OVERAGE, amount=-over, grant=None,
                                           reference=f"usage:{request.event_id}"[:255]))
            )
        ledger_after = wallet.ledger_balance + sum(
            (m.amount for _, m in movements_by_wallet[wallet.pk]), ZERO)
        event.status = UsageEvent.Status.CHARGED
        event.response = {
            "event_id": request.event_id,
            "status": "charged",
            "credits": str(credits),
            "allocations": [{"grant": g.pk, "amount": str(take)} for g, take in allocations]
            + ([{"grant": None, "amount": str(over), "overage": True}] if over > 0 else []),
            "balance": {"available": str(available - credits), "ledger_balance": str(ledger_after)},
        }
        results[i] = ChargeResult(event_id=request.event_id, status="charged", http_status=201, body=event.response,
                                  credits=credits)
        last_available[wallet.pk] = available - credits
        new_events.append(event)

    UsageEvent.objects.bulk_create(new_events)
    for grant in touched.values():
        if grant.remaining == 0:
            grant.status = CreditGrant.Status.DEPLETED
    if touched:
        CreditGrant.objects.bulk_update(list(touched.values()), ["remaining", "status"])
    for wallet_id, indexed in movements_by_wallet.items():
        movements = []
        for event_index, movement in indexed:
            movement.usage_event_id = new_events[event_index].pk
            movements.append(movement)
        append_entries(wallet=wallets[wallet_id], movements=movements, overage_delta=overage_by_wallet[wallet_id])
    captured = [r for r in reservations.values() if r.status == Reservation.Status.CAPTURED]
    for reservation in captured:
        event = next(e for e in new_events if e.reservation_id == reservation.pk)
        reservation.usage_event_id = event.pk
    if captured:
        Reservation.objects.bulk_update(captured, ["status", "closed_at", "usage_event"])
    for wallet_id, after in last_available.items():
        wallet = wallets[wallet_id]
        if wallet.crosses_alert_mark(first_available[wallet_id], after):
            events.balance_crossed(wallet=wallet, before=first_available[wallet_id], after=after, cause="usage")


_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


def _consumption_key(grant: CreditGrant):
    """DESIGN.md §3 order, the same as ``GrantQuerySet.in_consumption_order``."""
    return (
        grant.priority,
        grant.expires_at or _FAR_FUTURE,
        grant.per_unit_cost_basis,
        grant.effective_at,
        grant.created_at,
        grant.pk,
    )
