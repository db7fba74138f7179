"""Real-time usage charging: one engine for single events, batches and captures.

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
  ``rejected`` and charges nothing, the others in the batch still charge;
- on a wallet with team spending limits an event of a limited team that would
  take the team over its month's limit is stored as ``rejected`` (402
  ``team_limit_exceeded``); the team's counter row is locked after the wallet
  (``billing.services.team_limits``), other teams are unaffected.

A single event without a reservation takes the fast path: the PostgreSQL
function of migration 0005 does the same work in one statement (one round
trip, locks held only for it and its commit) and hands back to this engine,
having written nothing, whenever it would differ (tests/billing/test_hot_path.py).
A batch is priced and deduplicated here, then ``_charge_in_database`` hands the
priced events to the function of migration 0019 (the same locks, decisions and
rows as ``_charge``, set-based, one round trip); reservation captures and limited
teams stay on ``_charge``.
"""

from __future__ import annotations

import decimal
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from json.encoder import encode_basestring_ascii as _json_string

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from billing import events, prepared
from billing.errors import InvalidRequest
from billing.models import (
    CreditGrant,
    Customer,
    Feature,
    FeatureCost,
    LedgerEntry,
    Reservation,
    TeamSpend,
    UsageEvent,
    Wallet,
)
from billing.numbers import MAX_CREDITS, ZERO, round_credits
from billing.services.ledger import Movement, append_entries_many
from billing.services.team_limits import lock_team_spends, team_limit_exceeded_body, team_of

OK_STATUS = {UsageEvent.Status.CHARGED: 201, UsageEvent.Status.REJECTED: 402}
# A single event without a reservation is charged by the database function of
# migration 0005 in one round trip (see ``_charge_one_in_database``). The
# differential test turns this off to run the Python engine on the same scenarios.
FAST_PATH = True


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


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def request_hash(request: ChargeRequest) -> str:
    """SHA-256 of the payload's canonical JSON: ``json.dumps({customer, feature,
    quantity, occurred_at, properties, reservation}, sort_keys=True, separators=(",",
    ":"), default=str)``, written out key by key (a batch hashes 1,000 events; the
    string is the same, tests/billing/test_hot_path.py checks it)."""
    occurred_at, properties, reservation = request.occurred_at, request.properties, request.reservation_id
    canonical = (
        f'{{"customer":{_json_string(request.customer.external_id)},"feature":{_json_string(request.feature.key)},'
        f'"occurred_at":{_json_string(occurred_at.isoformat()) if occurred_at else "null"},'
        f'"properties":{_CANONICAL.encode(properties) if properties else "{}"},'
        f'"quantity":{_json_string(str(request.quantity.normalize()))},'
        f'"reservation":{"null" if reservation is None else _CANONICAL.encode(reservation)}}}'
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


# Model.from_db takes the values in the model's field order.
_RATE_FIELDS = [f.attname for f in FeatureCost._meta.concrete_fields
                if f.attname in ("id", "feature_id", "customer_id", "effective_from", "credits_per_unit")]
_RATES_SQL = (
    f"SELECT {', '.join(_RATE_FIELDS)} FROM {FeatureCost._meta.db_table}"
    " WHERE feature_id = ANY (%s::bigint[]) AND effective_from <= %s"
    " AND (customer_id IS NULL OR customer_id = ANY (%s::bigint[])) ORDER BY effective_from DESC, id DESC"
)


def _rates_for(requests: list[ChargeRequest]) -> dict[tuple[int, int | None], list[FeatureCost]]:
    """Every rate version of the features involved, newest first, keyed by (feature, customer|None)."""
    feature_ids = sorted({r.feature.id for r in requests})
    customer_ids = sorted({r.customer.id for r in requests})
    latest = max(r.occurred_at for r in requests)
    table: dict[tuple[int, int | None], list[FeatureCost]] = defaultdict(list)
    for row in prepared.fetch(_RATES_SQL, (feature_ids, latest, customer_ids), all_rows=True):
        rate = FeatureCost.from_db(DEFAULT_DB_ALIAS, _RATE_FIELDS, row)
        table[(rate.feature_id, rate.customer_id)].append(rate)
    return table


def _pick_rate(table, request: ChargeRequest) -> FeatureCost | None:
    for key in ((request.feature.id, request.customer.id), (request.feature.id, None)):
        for version in table.get(key, ()):
            if version.effective_from <= request.occurred_at:
                return version
    return None


def _lock_event_ids(requests: list[ChargeRequest]) -> None:
    keys = sorted({(r.customer.id, r.event_id) for r in requests})
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_advisory_xact_lock(k.c, hashtext(k.e))) FROM json_to_recordset(%s::json) AS k(c int, e text)",
            [json.dumps([{"c": c, "e": e} for c, e in keys])],
        )


def _rejection(code: str, message: str, details: dict) -> dict:
    return {"error": {"code": code, "message": message, "details": details}}


def _insufficient(event_id: str, credits: Decimal, available: Decimal) -> ChargeResult:
    shown = round_credits(max(available, ZERO))  # "0.000000", never "0", for an empty wallet
    body = _rejection("insufficient_credits", f"The wallet has {shown} credits available; this event needs {credits}.",
                      {"required": str(credits), "available": str(shown), "event_id": event_id})
    return ChargeResult(event_id=event_id, status="rejected", http_status=402, body=body, credits=credits,
                        error=body["error"])


def _paused(event_id: str, credits: Decimal, paused_reason: str) -> ChargeResult:
    body = _rejection("insufficient_credits", "The wallet is paused until credits arrive.",
                      {"required": str(credits), "available": "0.000000", "reason": "wallet_paused",
                       "paused_reason": paused_reason, "event_id": event_id})
    return ChargeResult(event_id=event_id, status="rejected", http_status=402, body=body, credits=credits,
                        error=body["error"])


def _charged(event_id: str, credits: Decimal, allocations: list[tuple[int, Decimal]], over: Decimal,
             available_after: Decimal, ledger_after: Decimal) -> ChargeResult:
    body = {
        "event_id": event_id,
        "status": "charged",
        "credits": str(credits),
        "allocations": [{"grant": grant_id, "amount": str(take)} for grant_id, take in allocations]
        + ([{"grant": None, "amount": str(over), "overage": True}] if over > 0 else []),
        "balance": {"available": str(available_after), "ledger_balance": str(ledger_after)},
    }
    return ChargeResult(event_id=event_id, status="charged", http_status=201, body=body, credits=credits)


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
    hashes = _request_hashes(requests)  # before defaulting: an omitted occurred_at is part of the payload
    for request in requests:
        request.occurred_at = request.occurred_at or now
    if FAST_PATH and len(requests) == 1:
        result = _charge_one_in_database(requests[0], hashes[0], now)
        if result is not None:
            return [result]
    results: list[ChargeResult | None] = [None] * len(requests)

    with transaction.atomic():
        if not (FAST_PATH and _charge_in_database(requests, hashes, results, now)):
            _charge_in_python(requests, hashes, results, now)
    return results  # type: ignore[return-value]


def _request_hashes(requests: list[ChargeRequest]) -> list[str]:
    """``request_hash`` of each request, computed once per distinct payload: a batch
    repeats a few payloads under many event ids (the event id is not hashed). Only a
    payload without properties or reservation is shared, keyed by what its canonical
    JSON is made of (the quantity's sign too: 0 and -0 are equal but hash apart; the
    timestamp's offset too: one instant, two texts)."""
    hashes = []
    known: dict[tuple, str] = {}
    for request in requests:
        quantity, occurred_at = request.quantity, request.occurred_at
        if request.properties or request.reservation_id is not None or type(quantity) is not Decimal:
            hashes.append(request_hash(request))
            continue
        key = (request.customer.external_id, request.feature.key, quantity, quantity.is_signed(), occurred_at,
               occurred_at.utcoffset() if occurred_at is not None else None)
        hash_ = known.get(key)
        if hash_ is None:
            hash_ = known[key] = request_hash(request)
        hashes.append(hash_)
    return hashes


def _charge_in_python(requests, hashes, results, now) -> None:
    """The Python engine for a list of events: event-id locks, replays, pricing, then ``_charge``."""
    _lock_event_ids(requests)
    existing = _existing_events(requests)
    rates = _rates_for(requests)
    seen: dict[tuple[int, str], int] = {}
    todo: list[int] = []
    for i, request in enumerate(requests):
        key = (request.customer.id, request.event_id)
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
            results[i] = _no_rate(request)
            continue
        if abs(request.quantity * rate.credits_per_unit) > MAX_CREDITS:
            results[i] = _too_big(request.event_id)
            continue
        todo.append(i)
        request._rate = rate  # type: ignore[attr-defined]

    if todo:
        _charge(requests, hashes, todo, results, now)

    for i, result in enumerate(results):
        if isinstance(result, tuple):
            results[i] = _repeat(requests[i].event_id, results[result[1]])


def _repeat(event_id: str, first: ChargeResult) -> ChargeResult:
    """The answer to an event id repeated in one batch with the same payload: the first one's, as a duplicate."""
    return ChargeResult(event_id=event_id, status="duplicate", http_status=first.http_status, body=first.body,
                        credits=first.credits, error=first.error)


def _charge_one_in_database(request: ChargeRequest, hash_: str, now: datetime) -> ChargeResult | None:
    """Charge one event through ``creditdesk_usage_charge`` (migration 0005): the same
    locks, decisions and rows as the Python engine, in one statement, so that in
    autocommit the grant and wallet locks are held only for that statement and its
    commit. Returns None, having written nothing, when the Python engine must decide
    (a reservation, a balance-crossing hook to call, a product Python would round)."""
    quantity = request.quantity
    if (request.reservation_id is not None or not isinstance(quantity, Decimal) or not quantity.is_finite()
            or timezone.is_naive(request.occurred_at)):
        return None
    (outcome, credits, available, ledger_after, grant_ids, takes, over, paused_reason, prior_status,
     prior_response, prior_credits, prior_hash_matches) = prepared.fetch(
        "SELECT * FROM creditdesk_usage_charge(%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s)",
        (request.customer.id, request.wallet_id, request.feature.id, request.event_id, quantity,
         request.occurred_at, json.dumps(request.properties), hash_, now, timezone.now(),
         decimal.getcontext().prec))
    if outcome == "no_rate":
        return _no_rate(request)
    return database_outcome(request.event_id, outcome, credits, available, ledger_after, grant_ids, takes, over,
                            paused_reason, prior_status, prior_response, prior_credits, prior_hash_matches)


class _BatchCharged(ChargeResult):
    """A charged event of a batch: its body is the JSON text ``creditdesk_usage_charge_batch``
    wrote of ``_charged``'s answer (same keys, order and texts), parsed when first read (the
    batch API's answer needs only the status and the credits)."""

    def __init__(self, event_id: str, credits: Decimal, response: str):
        self.event_id, self.status, self.http_status, self.credits, self.error = event_id, "charged", 201, credits, None
        self._response = response

    @property
    def body(self) -> dict:
        body = self.__dict__.get("_body")
        if body is None:
            body = self.__dict__["_body"] = json.loads(self._response)
        return body


def database_outcome(event_id: str, outcome: str, credits, available, ledger_after, grant_ids, takes, over,
                     paused_reason, prior_status, prior_response, prior_credits,
                     prior_hash_matches) -> ChargeResult | None:
    """The answer to ``creditdesk_usage_charge``'s outputs: charged, rejected (credits or a paused
    wallet), a replay or a conflict; None for ``no_rate`` and ``fallback`` (nothing was written)."""
    if outcome == "charged":
        return _charged(event_id, credits, list(zip(grant_ids, takes, strict=True)), over, available - credits,
                        ledger_after)
    if outcome == "rejected":
        return _insufficient(event_id, credits, available)
    if outcome == "duplicate":
        if not prior_hash_matches:
            return _conflict(event_id)
        body = _in_answer_order(json.loads(prior_response))
        return ChargeResult(event_id=event_id, status="duplicate", http_status=OK_STATUS[prior_status],
                            body=body, credits=prior_credits, error=body.get("error"))
    if outcome == "paused":
        return _paused(event_id, credits, paused_reason)
    return None


# The per-event arrays travel as text PostgreSQL parses in C (an array literal of integers,
# a JSON array of event ids), not as lists psycopg adapts element by element.
_BATCH_SQL = (
    "SELECT * FROM creditdesk_usage_charge_batch(%s::integer[],"
    " ARRAY(SELECT e FROM json_array_elements_text(%s::json) WITH ORDINALITY AS t(e, o) ORDER BY o),"
    " %s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[],"
    " %s::text[], %s::text[], %s, %s)"
)


def _charge_in_database(requests, hashes, results, now) -> bool:
    """Every event of ``requests`` through ``creditdesk_usage_charge_batch`` (migration
    0021), filling ``results`` as ``_charge_in_python`` would: the same event-id locks,
    replays, refusals, locks (grants, then wallets, in primary-key order), decisions and
    rows, in one statement. Returns False, having written nothing, when the Python engine
    must decide: a reservation to capture or a team with a spending limit on its wallet.
    Calls the balance-crossing hook as ``_charge`` does.

    Each distinct payload is priced and sent once (a "shape"); per event only its shape
    and event id. A repeated (customer, event id) is not sent: it is answered here from
    its first occurrence's answer (or from the stored event the function returns)."""
    if any(r.reservation_id is not None for r in requests):
        return False
    rates = _rates_for(requests)
    firsts: dict[tuple[int, str], int] = {}
    repeats: list[tuple[int, int]] = []
    shapes: dict = {}
    refusals: list[ChargeResult | None] = []  # per shape: the answer of an event that is not charged
    s_credits: list[Decimal | None] = []
    s_customer, s_wallet, s_feature, s_rate = [], [], [], []
    s_quantity, s_occurred_at, s_properties, s_unit, s_credits_text, s_hash = [], [], [], [], [], []
    p_shape: list[int] = []
    p_event: list[str] = []
    p_index: list[int] = []
    for i, request in enumerate(requests):
        customer_id = request.customer.id
        key = (customer_id, request.event_id)
        first = firsts.get(key)
        if first is not None:
            repeats.append((i, first))
            continue
        firsts[key] = i
        hash_ = hashes[i]
        # The hash fixes customer, feature, quantity, occurred_at and (empty) properties; with the wallet, the row.
        shape_key = (hash_, customer_id, request.wallet_id, request.feature.id) if not request.properties else -i
        shape = shapes.get(shape_key)
        if shape is None:
            shape = shapes[shape_key] = len(s_hash) + 1
            refusal = credits = None
            rate = _pick_rate(rates, request)
            if rate is None:
                refusal = _no_rate(request)
            elif abs(request.quantity * rate.credits_per_unit) > MAX_CREDITS:
                refusal = _too_big(request.event_id)
            else:
                credits = round_credits(request.quantity * rate.credits_per_unit)
            refusals.append(refusal)
            s_credits.append(credits)
            s_customer.append(customer_id)
            s_wallet.append(request.wallet_id)
            s_feature.append(request.feature.id)
            s_quantity.append(str(request.quantity))
            s_occurred_at.append(request.occurred_at.isoformat())
            s_properties.append(json.dumps(request.properties))
            s_rate.append(rate.id if rate is not None else None)
            s_unit.append(str(rate.credits_per_unit) if rate is not None else None)
            s_credits_text.append(str(credits) if credits is not None else None)
            s_hash.append(hash_)
        refusal = refusals[shape - 1]
        if refusal is not None:
            results[i] = ChargeResult(event_id=request.event_id, status=refusal.status,
                                      http_status=refusal.http_status, body=refusal.body, error=refusal.error)
        p_shape.append(shape)
        p_event.append(request.event_id)
        p_index.append(i)

    decided = prepared.fetch(_BATCH_SQL, (
        "{" + ",".join(map(str, p_shape)) + "}", json.dumps(p_event), s_customer, s_wallet, s_feature, s_quantity,
        s_occurred_at, s_properties, s_rate, s_unit, s_credits_text, s_hash, now, timezone.now()), all_rows=True)
    if decided and decided[-1][1] == "fallback":
        return False

    priors: dict[int, _PriorEvent] = {}
    first_available: dict[int, Decimal] = {}
    last_charged: dict[int, tuple] = {}  # wallet -> the row of its last charged event
    for row in decided:
        (n, outcome, available, response, paused_reason, _, _, prior_status, prior_hash, prior_response,
         prior_credits) = row
        i = p_index[n - 1]
        event_id = requests[i].event_id
        if outcome == "duplicate":
            prior = priors[i] = _PriorEvent(prior_status, prior_hash, json.loads(prior_response), prior_credits)
            results[i] = _replay(prior, hashes[i], event_id)
            continue
        credits = s_credits[p_shape[n - 1] - 1]
        wallet_id = requests[i].wallet_id
        first_available.setdefault(wallet_id, available)
        if outcome == "charged":
            results[i] = _BatchCharged(event_id, credits, response)
            last_charged[wallet_id] = row
        elif outcome == "rejected":
            results[i] = _insufficient(event_id, credits, available)
        else:
            results[i] = _paused(event_id, credits, paused_reason)
    for i, first in repeats:
        prior = priors.get(first)
        event_id = requests[i].event_id
        if prior is not None:
            results[i] = _replay(prior, hashes[i], event_id)
        elif hashes[i] != hashes[first]:
            results[i] = _conflict(event_id)
        else:
            results[i] = _repeat(event_id, results[first])
    last_available = {wallet_id: row[2] - s_credits[p_shape[row[0] - 1] - 1]
                      for wallet_id, row in last_charged.items()}
    crossing = [wallet_id for wallet_id, after in last_available.items()
                if Wallet(alert_below=last_charged[wallet_id][5], alert_at_or_above=last_charged[wallet_id][6])
                .crosses_alert_mark(first_available[wallet_id], after)]
    if crossing:
        wallets = Wallet.objects.in_bulk(crossing)
        for wallet_id in crossing:
            events.balance_crossed(wallet=wallets[wallet_id], before=first_available[wallet_id],
                                   after=last_available[wallet_id], cause="usage")
    return True


@dataclass
class _PriorEvent:
    status: str
    request_hash: str
    response: dict
    credits: Decimal


def _existing_events(requests: list[ChargeRequest]) -> dict[tuple[int, str], _PriorEvent]:
    keys = sorted({(r.customer.id, r.event_id) for r in requests})
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT u.customer_id, u.event_id, u.status, u.request_hash, u.response::text, u.credits"
            f" FROM {UsageEvent._meta.db_table} u JOIN json_to_recordset(%s::json) AS k(c bigint, e text)"
            f" ON u.customer_id = k.c AND u.event_id = k.e",
            [json.dumps([{"c": c, "e": e} for c, e in keys])],
        )
        rows = cursor.fetchall()
    return {(customer_id, event_id): _PriorEvent(status, request_hash, json.loads(response), credits)
            for customer_id, event_id, status, request_hash, response, credits in rows}


def _replay(prior: _PriorEvent, hash_: str, event_id: str) -> ChargeResult:
    if prior.request_hash != hash_:
        return _conflict(event_id)
    body = _in_answer_order(prior.response)
    return ChargeResult(
        event_id=event_id, status="duplicate", http_status=OK_STATUS[prior.status], body=body,
        credits=prior.credits, error=body.get("error"),
    )


# The key order of a first answer, per enclosing key. A stored answer comes back from
# jsonb in jsonb's own key order; a replay restores this one, byte-for-byte the same.
_ANSWER_ORDER = {
    None: ("event_id", "status", "credits", "allocations", "balance", "error"),
    "allocations": ("grant", "amount", "overage"),
    "balance": ("available", "ledger_balance"),
    "error": ("code", "message", "details"),
    "details": ("required", "available", "reason", "paused_reason", "team", "limit", "spent", "requested", "period",
                "event_id"),
}


def _in_answer_order(value, parent: str | None = None):
    if isinstance(value, dict):
        order = _ANSWER_ORDER.get(parent, ())
        keys = sorted(value, key=lambda k: order.index(k) if k in order else len(order))
        return {key: _in_answer_order(value[key], key) for key in keys}
    if isinstance(value, list):
        return [_in_answer_order(item, parent) for item in value]
    return value


def _conflict(event_id: str) -> ChargeResult:
    body = _rejection("idempotency_conflict", f"Event {event_id!r} was already received with a different payload.",
                      {"event_id": event_id})
    return ChargeResult(event_id=event_id, status="conflict", http_status=409, body=body, error=body["error"])


def _no_rate(request: ChargeRequest) -> ChargeResult:
    return _invalid(
        request.event_id,
        f"Feature {request.feature.key!r} has no credit cost effective at {request.occurred_at.isoformat()}.",
        {"occurred_at": "no credit cost is effective at this time"},
    )


def _too_big(event_id: str) -> ChargeResult:
    # More than a ledger entry can hold (NUMERIC(20,6)): refuse it rather than fail the batch.
    return _invalid(event_id, f"quantity × credit cost is more than one event may charge ({MAX_CREDITS} credits).",
                    {"quantity": f"priced at more than {MAX_CREDITS} credits"})


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
    wallets = {w.id: w for w in Wallet.objects.select_for_update(of=("self",)).filter(pk__in=wallet_ids).order_by("pk")}
    # Only wallets with team limits look for them (their counters are locked after the wallets).
    team_spends = lock_team_spends(keys=[
        (requests[i].wallet_id, team, requests[i].customer.timezone) for i in todo
        if wallets[requests[i].wallet_id].has_team_limits and (team := team_of(requests[i].properties)) is not None
    ], now=now) if any(wallets[w].has_team_limits for w in wallet_ids) else {}
    reservation_ids = sorted({requests[i].reservation_id for i in todo if requests[i].reservation_id})
    reservations = (
        {r.id: r for r in Reservation.objects.select_for_update(of=("self",)).filter(pk__in=reservation_ids).order_by("pk")}
        if reservation_ids else {}
    )
    held = dict(
        Reservation.objects.filter(wallet_id__in=wallet_ids, status=Reservation.Status.OPEN, expires_at__gt=now)
        .values_list("wallet_id").annotate(total=Sum("amount")).values_list("wallet_id", "total")
    )

    grants_by_wallet: dict[int, list[CreditGrant]] = defaultdict(list)
    for grant in sorted(grant_rows, key=_consumption_key):
        grants_by_wallet[grant.wallet_id].append(grant)

    new_events: list[_NewEvent] = []
    movements_by_wallet: dict[int, list[tuple[int, Movement]]] = defaultdict(list)
    overage_by_wallet: dict[int, Decimal] = defaultdict(lambda: ZERO)
    moved_by_wallet: dict[int, Decimal] = defaultdict(lambda: ZERO)
    touched: dict[int, CreditGrant] = {}
    first_available: dict[int, Decimal] = {}
    last_available: dict[int, Decimal] = {}

    for i in todo:
        request = requests[i]
        rate: FeatureCost = request._rate
        wallet = wallets[request.wallet_id]
        credits = round_credits(request.quantity * rate.credits_per_unit)
        usable = [g for g in grants_by_wallet[wallet.id] if g.remaining > 0 and g.feature_id in (None, request.feature.id)]
        reservation = reservations.get(request.reservation_id) if request.reservation_id else None
        if request.reservation_id and (reservation is None or not reservation.is_open(now)
                                       or reservation.wallet_id != wallet.id):
            body = _rejection("conflict", "The reservation is no longer open (captured, released or expired).",
                              {"reservation": request.reservation_id})
            results[i] = ChargeResult(event_id=request.event_id, status="conflict", http_status=409, body=body,
                                      error=body["error"])
            continue
        wallet_held = held.get(wallet.id, ZERO)
        if reservation is not None and reservation.status == Reservation.Status.OPEN:
            wallet_held -= reservation.amount
        usable_total = sum((g.remaining for g in usable), ZERO)
        borrow = max(wallet.credit_limit - wallet.overage - overage_by_wallet[wallet.id], ZERO) if (
            wallet.policy == Wallet.Policy.OVERDRAFT) else ZERO
        available = usable_total - wallet_held + borrow
        first_available.setdefault(wallet.id, available)
        if wallet.status == Wallet.Status.PAUSED:
            results[i] = _paused(request.event_id, credits, wallet.paused_reason)
            continue
        event = _NewEvent(request, rate, credits, hashes[i])
        team_spend = team_spends.get((wallet.id, team_of(request.properties))) if team_spends else None
        if team_spend is not None and credits > 0 and team_spend.spent + credits > team_spend.team_limit.monthly_limit:
            event.status = UsageEvent.Status.REJECTED
            body = team_limit_exceeded_body(
                event_id=request.event_id, team=team_spend.team_limit.team, limit=team_spend.team_limit.monthly_limit,
                spent=team_spend.spent, requested=credits, start=team_spend.period_start)
            results[i] = ChargeResult(event_id=request.event_id, status="rejected", http_status=402, body=body,
                                      credits=credits, error=body["error"])
            event.response = body
            new_events.append(event)
            continue
        if credits > available:
            event.status = UsageEvent.Status.REJECTED
            results[i] = _insufficient(request.event_id, credits, available)
            event.response = results[i].body
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
            touched[grant.id] = grant
            allocations.append((grant, take))
        over = credits - sum((take for _, take in allocations), ZERO)
        if over > 0:
            overage_by_wallet[wallet.id] += over
        if reservation is not None:
            reservation.status = Reservation.Status.CAPTURED
            reservation.closed_at = now
            held[wallet.id] = held.get(wallet.id, ZERO) - reservation.amount
        for grant, take in allocations:
            movements_by_wallet[wallet.id].append(
                (len(new_events), Movement(type=LedgerEntry.Type.USAGE, amount=-take, grant=grant,
                                           reference=f"usage:{request.event_id}"[:255]))
            )
        if over > 0:
            movements_by_wallet[wallet.id].append(
                (len(new_events), Movement(type=LedgerEntry.Type.OVERAGE, amount=-over, grant=None,
                                           reference=f"usage:{request.event_id}"[:255]))
            )
        # The running total of the wallet's movements so far (exact: no rounding in these sums).
        moved_by_wallet[wallet.id] += sum((-take for _, take in allocations), ZERO) - (over if over > 0 else ZERO)
        ledger_after = wallet.ledger_balance + moved_by_wallet[wallet.id]
        event.status = UsageEvent.Status.CHARGED
        results[i] = _charged(request.event_id, credits, [(g.id, take) for g, take in allocations], over,
                              available - credits, ledger_after)
        event.response = results[i].body
        last_available[wallet.id] = available - credits
        if team_spend is not None:
            team_spend.spent += credits
        new_events.append(event)

    _insert_events(new_events, now)
    for grant in touched.values():
        if grant.remaining == 0:
            grant.status = CreditGrant.Status.DEPLETED
    if touched:
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {CreditGrant._meta.db_table} g SET remaining = v.remaining, status = v.status"
                f" FROM json_to_recordset(%s::json) AS v(id bigint, remaining numeric, status text) WHERE g.id = v.id",
                [json.dumps([{"id": g.id, "remaining": str(g.remaining), "status": g.status}
                             for g in touched.values()])],
            )
    appends = []
    for wallet_id, indexed in movements_by_wallet.items():
        movements = []
        for event_index, movement in indexed:
            movement.usage_event_id = new_events[event_index].pk
            movements.append(movement)
        appends.append((wallets[wallet_id], movements, overage_by_wallet[wallet_id]))
    append_entries_many(appends)
    # Only holds captured by this call: one captured earlier was answered 409 above.
    capturing = {e.reservation_id: e for e in new_events if e.reservation_id and e.status == UsageEvent.Status.CHARGED}
    captured = [r for r in reservations.values() if r.id in capturing]
    for reservation in captured:
        reservation.usage_event_id = capturing[reservation.pk].pk
    if captured:
        Reservation.objects.bulk_update(captured, ["status", "closed_at", "usage_event"])
    if team_spends:
        TeamSpend.objects.bulk_update(list(team_spends.values()), ["spent"])
    for wallet_id, after in last_available.items():
        wallet = wallets[wallet_id]
        if wallet.crosses_alert_mark(first_available[wallet_id], after):
            events.balance_crossed(wallet=wallet, before=first_available[wallet_id], after=after, cause="usage")


class _NewEvent:
    """A usage event to store: what ``_insert_events`` writes in one statement."""

    __slots__ = ("request", "rate", "credits", "request_hash", "status", "response", "pk")

    def __init__(self, request: ChargeRequest, rate: FeatureCost, credits: Decimal, request_hash: str):
        self.request, self.rate, self.credits, self.request_hash = request, rate, credits, request_hash
        self.status = ""
        self.response: dict = {}
        self.pk: int | None = None

    @property
    def reservation_id(self) -> int | None:
        return self.request.reservation_id


def _insert_events(new_events: list[_NewEvent], now: datetime) -> None:
    """One INSERT for every new event, ids assigned in list order (the column
    conversions are PostgreSQL's own, as for the ORM: numerics rounded to the
    column's scale, JSON stored as jsonb)."""
    if not new_events:
        return
    rows = [
        {"n": n, "customer_id": e.request.customer.id, "wallet_id": e.request.wallet_id,
         "feature_id": e.request.feature.id, "event_id": e.request.event_id, "quantity": str(e.request.quantity),
         "occurred_at": e.request.occurred_at.isoformat(), "properties": e.request.properties, "rate_id": e.rate.id,
         "credits_per_unit": str(e.rate.credits_per_unit), "credits": str(e.credits), "status": e.status,
         "request_hash": e.request_hash, "response": e.response, "reservation_id": e.reservation_id}
        for n, e in enumerate(new_events)
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            f"""WITH inserted AS (
                INSERT INTO {UsageEvent._meta.db_table} (customer_id, wallet_id, feature_id, event_id, quantity,
                    occurred_at, properties, rate_id, credits_per_unit, credits, status, request_hash, response,
                    reservation_id, created_at)
                SELECT customer_id, wallet_id, feature_id, event_id, quantity, occurred_at, properties, rate_id,
                       credits_per_unit, credits, status, request_hash, response, reservation_id, %s
                  FROM json_to_recordset(%s::json) AS v(n int, customer_id bigint, wallet_id bigint,
                       feature_id bigint, event_id text, quantity numeric, occurred_at timestamptz, properties jsonb,
                       rate_id bigint, credits_per_unit numeric, credits numeric, status text, request_hash text,
                       response jsonb, reservation_id bigint)
                 ORDER BY n
                RETURNING id, customer_id, event_id)
            SELECT id, customer_id, event_id FROM inserted""",
            [now, json.dumps(rows)],
        )
        ids = {(customer_id, event_id): pk for pk, customer_id, event_id in cursor.fetchall()}
    for event in new_events:
        event.pk = ids[(event.request.customer.id, event.request.event_id)]


_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


def _consumption_key(grant: CreditGrant):
    """DESIGN.md §3 order, the same as ``GrantQuerySet.in_consumption_order``."""
    return (
        grant.priority,
        grant.expires_at or _FAR_FUTURE,
        grant.per_unit_cost_basis,
        grant.effective_at,
        grant.created_at,
        grant.id,
    )
