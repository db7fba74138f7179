"""Revenue recognition (DESIGN.md §5, invariant 7): reads only, computed on the
fly from the append-only ledger, the credit notes and the invoices.

Paid grants
    Grants of kind ``prepaid`` or ``contract`` that carry money: a pack
    purchase's grant (money paid = its PackPurchase total), a contract grant
    (money paid = round_money(original × per-unit cost basis)), any other
    prepaid grant with a price paid. Grants that settle overage billed on an
    invoice (a plan period's overage grant, a contract's true-up grant) are
    not: their money is overage / true-up revenue, recognized when invoiced.
    Money is deferred when the grant is credited (its ``grant`` ledger entry),
    so a grant waiting for payment or approval defers nothing yet.

Figures of one grant through a moment T (entries created before T)
    recognized = round_money(paid × consumed / original), consumed being every
    debit that is not an expiry, a void or a refund (usage, negative
    adjustments, overage repaid, rollover out);
    refunded   = the credit notes' amounts (each rounded once);
    breakage   = 0 until the grant lapses (expiry or void of what was left);
                 then exactly the rest: paid − recognized − refunded;
    a grant emptied by consumption or refunds recognizes exactly the rest;
    deferred   = paid − recognized − breakage − refunded.
    So recognized + deferred + breakage + refunded = paid to the cent by
    construction; a month's figure is the difference of two cumulative
    figures, so months never drift from the cumulative totals.

Plan fees are recognized over their subscription period (pro rata by time,
cumulative rounding as above), net of the proration credits on the period's
invoice; fee lines without a period, overage and true-up lines when their
invoice is issued. Void and draft invoices count for
nothing. Months run in ``settings.TIME_ZONE``. Promotional credits earn
nothing; their consumption is reported as promotion cost at the list price
(``promotion_list_price``).

Why not a stored journal: every figure is a sum over immutable ledger rows,
one grouped pass per report (measured on a 2-million-entry ledger in the
README), so there is nothing to keep in step, no job whose lag would make the
report disagree with the ledger, and nothing added to the usage hot path.
"""

from __future__ import annotations

import hashlib
import zoneinfo
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from billing.models import (
    CreditGrant,
    CreditNote,
    CreditPack,
    Invoice,
    InvoiceLine,
    LedgerEntry,
)
from billing.numbers import ZERO, minor_units, round_money, round_rate

# A bound after every entry: "as of everything written so far", even on a frozen clock.
ALL_TIME = datetime(9999, 1, 1, tzinfo=UTC)
PAID_KINDS = (CreditGrant.Kind.PREPAID, CreditGrant.Kind.CONTRACT)
LAPSE_TYPES = (LedgerEntry.Type.EXPIRY, LedgerEntry.Type.VOID)
NOT_CONSUMPTION = (LedgerEntry.Type.GRANT, *LAPSE_TYPES, LedgerEntry.Type.REFUND)
LIVE_INVOICE = (Invoice.Status.ISSUED, Invoice.Status.PAID)


def paid_grants():
    """The grants revenue is deferred for (see the module docstring)."""
    return (
        CreditGrant.objects.filter(kind__in=PAID_KINDS)
        .filter(Q(price_paid__gt=0) | Q(per_unit_cost_basis__gt=0) | Q(purchase__isnull=False))
        .exclude(kind=CreditGrant.Kind.PREPAID, source=CreditGrant.Source.PLAN_PERIOD)
        .exclude(true_up__isnull=False)
    )


def money_paid(*, kind: str, original: Decimal, basis: Decimal, price_paid: Decimal, purchase_total: Decimal | None,
               currency: str) -> Decimal:
    if purchase_total is not None:
        return purchase_total
    if kind == CreditGrant.Kind.CONTRACT:
        return round_money(original * basis, currency)
    return price_paid


@dataclass(frozen=True)
class LedgerPosition:
    """A grant's credits through a moment, from its ledger entries."""

    activated: bool = False
    consumed: Decimal = ZERO
    lapsed: Decimal = ZERO
    refunded: Decimal = ZERO
    remaining: Decimal = ZERO


@dataclass(frozen=True)
class GrantFigures:
    """A grant's money through a moment: recognized + deferred + breakage + refunded = paid."""

    paid: Decimal = ZERO
    recognized: Decimal = ZERO
    breakage: Decimal = ZERO
    refunded: Decimal = ZERO
    deferred: Decimal = ZERO


def grant_figures(*, paid: Decimal, original: Decimal, currency: str, position: LedgerPosition,
                  refunded_money: Decimal) -> GrantFigures:
    """The figures of one grant from its ledger position (see the module docstring)."""
    if not position.activated:
        return GrantFigures()
    paid, refunded_money = round_money(paid, currency), round_money(refunded_money, currency)
    recognized = round_money(paid * position.consumed / original, currency)
    breakage = ZERO
    if position.remaining == 0:
        if position.lapsed > 0:
            breakage = paid - recognized - refunded_money
        else:
            recognized = paid - refunded_money
    return GrantFigures(paid=paid, recognized=recognized, breakage=breakage, refunded=refunded_money,
                        deferred=paid - recognized - breakage - refunded_money)


def ledger_positions(grant_ids: list[int], bounds: list[datetime]) -> dict[int, list[LedgerPosition]]:
    """Each grant's ledger position just before each of ``bounds`` (ascending), in
    one grouped pass over its entries: every entry is summed into (grant, kind of
    movement, how many bounds it comes at or after), then added up per bound here."""
    if not grant_ids or not bounds:
        return {}
    sql = (
        "SELECT e.grant_id, CASE WHEN e.type = 'grant' THEN 0 WHEN e.type = ANY(%s) THEN 1 "
        "WHEN e.type = 'refund' THEN 2 ELSE 3 END, width_bucket(e.created_at, %s::timestamptz[]), SUM(e.amount) "
        f"FROM {LedgerEntry._meta.db_table} e WHERE e.grant_id = ANY(%s) AND e.created_at < %s GROUP BY 1, 2, 3"
    )
    # per grant, per bound: [granted, lapsed, refunded, consumed] (signed sums), activated
    sums: dict[int, list[list[Decimal]]] = defaultdict(lambda: [[ZERO] * 4 for _ in bounds])
    activated: dict[int, list[bool]] = defaultdict(lambda: [False] * len(bounds))
    with connection.cursor() as cursor:
        cursor.execute(sql, [list(LAPSE_TYPES), list(bounds), list(grant_ids), max(bounds)])
        for grant_id, movement, bucket, total in cursor.fetchall():
            # width_bucket counts the bounds at or before the entry: it lies before bounds[bucket:].
            for i in range(bucket, len(bounds)):
                sums[grant_id][i][movement] += total
                activated[grant_id][i] = activated[grant_id][i] or movement == 0
    return {
        grant_id: [
            LedgerPosition(activated=activated[grant_id][i], lapsed=-per_bound[i][1], refunded=-per_bound[i][2],
                           consumed=-per_bound[i][3], remaining=sum(per_bound[i], ZERO))
            for i in range(len(bounds))
        ]
        for grant_id, per_bound in sums.items()
    }


def refunded_money(grant_ids: list[int], bounds: list[datetime]) -> dict[int, list[Decimal]]:
    """Each grant's credit-note money issued before each of ``bounds``."""
    if not grant_ids or not bounds:
        return {}
    columns = ", ".join("COALESCE(SUM(n.amount) FILTER (WHERE n.issued_at < %s), 0)" for _ in bounds)
    sql = (f"SELECT n.grant_id, {columns} FROM {CreditNote._meta.db_table} n "
           "WHERE n.grant_id = ANY(%s) GROUP BY n.grant_id")
    with connection.cursor() as cursor:
        cursor.execute(sql, [*bounds, list(grant_ids)])
        return {row[0]: list(row[1:]) for row in cursor.fetchall()}


@dataclass(frozen=True)
class PaidGrant:
    id: int
    customer: str
    currency: str
    original: Decimal
    basis: Decimal
    paid: Decimal


def _paid_grant_rows(*, currency: str | None = None, created_before: datetime | None = None,
                     grant_ids: list[int] | None = None, after_pk: int | None = None,
                     limit: int | None = None) -> list[PaidGrant]:
    qs = paid_grants()
    if after_pk is not None:
        qs = qs.filter(pk__gt=after_pk)
    if currency:
        qs = qs.filter(currency=currency)
    if created_before is not None:
        qs = qs.filter(created_at__lt=created_before)
    if grant_ids is not None:
        qs = qs.filter(pk__in=grant_ids)
    rows = qs.order_by("pk").values_list("pk", "wallet__customer__external_id", "kind", "original_amount",
                                         "per_unit_cost_basis", "price_paid", "currency", "purchase__total_price")
    if limit is not None:
        rows = rows[:limit]
    return [
        PaidGrant(id=pk, customer=customer, currency=cur, original=original, basis=basis,
                  paid=money_paid(kind=kind, original=original, basis=basis, price_paid=price, purchase_total=total,
                                  currency=cur))
        for pk, customer, kind, original, basis, price, cur, total in rows
    ]


def figures_at(grants: list[PaidGrant], bounds: list[datetime]) -> dict[int, list[tuple[LedgerPosition, GrantFigures]]]:
    """Ledger position and money figures of each grant at each bound."""
    ids = [g.id for g in grants]
    positions = ledger_positions(ids, bounds)
    refunds = refunded_money(ids, bounds)
    empty = [LedgerPosition()] * len(bounds)
    result = {}
    for grant in grants:
        per_bound = []
        for i, position in enumerate(positions.get(grant.id, empty)):
            money = refunds.get(grant.id, [ZERO] * len(bounds))[i]
            per_bound.append((position, grant_figures(paid=grant.paid, original=grant.original,
                                                      currency=grant.currency, position=position,
                                                      refunded_money=money)))
        result[grant.id] = per_bound
    return result


def grant_figures_now(grant: CreditGrant, *, at: datetime | None = None) -> GrantFigures:
    """One grant's figures after everything written so far (or before ``at``);
    the refund service caps a refund at the deferred money left."""
    at = at or ALL_TIME
    rows = _paid_grant_rows(grant_ids=[grant.pk])
    if not rows:
        return GrantFigures()
    return figures_at(rows, [at])[grant.pk][0][1]


# --- Months ------------------------------------------------------------------


def reporting_zone() -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(settings.TIME_ZONE)


def month_start(year: int, month: int) -> datetime:
    return datetime(year, month, 1, tzinfo=reporting_zone())


def next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def month_of(moment: datetime) -> tuple[int, int]:
    local = moment.astimezone(reporting_zone())
    return local.year, local.month


# --- Revenue schedule of one grant -------------------------------------------


@dataclass(frozen=True)
class ScheduleMonth:
    month: date
    recognized: Decimal
    breakage: Decimal
    refunded: Decimal
    deferred_at_end: Decimal
    consumed_credits: Decimal


@dataclass
class GrantSchedule:
    grant: CreditGrant
    paid: Decimal
    months: list[ScheduleMonth] = field(default_factory=list)
    now: GrantFigures = GrantFigures()
    is_paid_grant: bool = True


def grant_schedule(grant: CreditGrant, *, now: datetime | None = None) -> GrantSchedule:
    """Paid, recognized per month, breakage, refunded and deferred now, for one paid grant."""
    now = now or timezone.now()
    rows = _paid_grant_rows(grant_ids=[grant.pk])
    if not rows:
        return GrantSchedule(grant=grant, paid=ZERO, is_paid_grant=False)
    # The grant's own entry comes first (the (grant, type) index finds it).
    first = (LedgerEntry.objects.filter(grant=grant, type=LedgerEntry.Type.GRANT).order_by("created_at")
             .values_list("created_at", flat=True).first())
    if first is None or first >= now:
        return GrantSchedule(grant=grant, paid=round_money(rows[0].paid, grant.currency))
    year, month = month_of(first)
    last = month_of(now)
    starts = [month_start(year, month)]
    while (year, month) != last:
        year, month = next_month(year, month)
        starts.append(month_start(year, month))
    bounds = starts[1:] + [now]
    both = figures_at(rows, [starts[0], *bounds])[grant.pk]
    positions, per_bound = [position for position, _ in both], [figures for _, figures in both]
    months = [
        ScheduleMonth(
            month=starts[i].date(), recognized=per_bound[i + 1].recognized - per_bound[i].recognized,
            breakage=per_bound[i + 1].breakage - per_bound[i].breakage,
            refunded=per_bound[i + 1].refunded - per_bound[i].refunded, deferred_at_end=per_bound[i + 1].deferred,
            consumed_credits=positions[i + 1].consumed - positions[i].consumed,
        )
        for i in range(len(starts))
    ]
    return GrantSchedule(grant=grant, paid=per_bound[-1].paid, months=months, now=per_bound[-1])


# --- Monthly revenue report ---------------------------------------------------


def promotion_list_price(currency: str) -> Decimal | None:
    """Money per promotional credit: CREDITDESK_PROMOTION_LIST_PRICE when set, else
    the catalog's reference pack (the smallest active prepaid pack in the
    currency) price ÷ credits; None when neither exists."""
    configured = settings.CREDITDESK_PROMOTION_LIST_PRICE
    if configured is not None:
        return configured
    pack = (CreditPack.objects.filter(kind=CreditPack.Kind.PREPAID, active=True, currency=currency, price__gt=0)
            .order_by("credits", "pk").first())
    return round_rate(pack.price / pack.credits) if pack else None


@dataclass(frozen=True)
class Check:
    label: str
    expected: Decimal
    actual: Decimal

    @property
    def ok(self) -> bool:
        return self.expected == self.actual

    @property
    def difference(self) -> Decimal:
        return self.actual - self.expected


@dataclass
class RevenueReport:
    year: int
    month: int
    currency: str
    starts_at: datetime
    ends_at: datetime
    opening_deferred: Decimal = ZERO
    new_deferred: Decimal = ZERO
    usage: Decimal = ZERO
    breakage: Decimal = ZERO
    refunds: Decimal = ZERO
    closing_deferred: Decimal = ZERO
    plan_fees: Decimal = ZERO
    overage: Decimal = ZERO
    true_up: Decimal = ZERO
    consumed_credits: Decimal = ZERO
    lapsed_credits: Decimal = ZERO
    refunded_credits: Decimal = ZERO
    promotional_credits: Decimal = ZERO
    list_price: Decimal | None = None
    promotion_cost: Decimal = ZERO
    credit_notes: int = 0
    paid_grants: int = 0
    invoiced: dict[str, Decimal] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def recognized_total(self) -> Decimal:
        return self.usage + self.breakage + self.plan_fees + self.overage + self.true_up

    @property
    def reconciles(self) -> bool:
        return all(check.ok for check in self.checks)

    def rows(self) -> list[tuple[str, str, Decimal | None, Decimal | None]]:
        """(section, item, credits, money) — the page's table and the CSV."""
        rows = [
            ("Recognized revenue", "Usage of prepaid credits", self.consumed_credits, self.usage),
            ("Recognized revenue", "Breakage (expired or voided credits)", self.lapsed_credits, self.breakage),
            ("Recognized revenue", "Plan fees (net of proration credits)", None, self.plan_fees),
            ("Recognized revenue", "Overage", None, self.overage),
            ("Recognized revenue", "True-up", None, self.true_up),
            ("Recognized revenue", "Total recognized", None, self.recognized_total),
            ("Deferred revenue", "Deferred at month start", None, self.opening_deferred),
            ("Deferred revenue", "Added by payments (prepaid and contract credits)", None, self.new_deferred),
            ("Deferred revenue", "Recognized on usage", None, -self.usage),
            ("Deferred revenue", "Recognized as breakage", None, -self.breakage),
            ("Deferred revenue", "Reversed by refunds", None, -self.refunds),
            ("Deferred revenue", "Deferred at month end", None, self.closing_deferred),
            ("Refunds", f"Credit notes ({self.credit_notes})", self.refunded_credits, self.refunds),
            ("Promotion cost", f"Promotional credits used × list price {_or_na(self.list_price)}",
             self.promotional_credits, self.promotion_cost),
        ]
        rows += [("Invoiced in the month (net of tax)", label, None, amount)
                 for label, amount in self.invoiced.items()]
        rows += [("Reconciliation", f"{check.label}: expected {check.expected}",
                  None, check.actual) for check in self.checks]
        return rows


def _or_na(value) -> str:
    return "n/a" if value is None else f"{value.normalize():f}"


def revenue_report(*, year: int, month: int, currency: str = "USD") -> RevenueReport:
    """The month's recognized revenue by source, the deferred roll-forward,
    refunds and promotion cost in ``currency``, with the checks that tie it to
    the ledger, the credit notes and the invoices."""
    start, end = month_start(year, month), month_start(*next_month(year, month))
    report = RevenueReport(year=year, month=month, currency=currency, starts_at=start, ends_at=end)
    grants = _paid_grant_rows(currency=currency, created_before=end)
    totals = figures_at(grants, [start, end])
    report.paid_grants = len(grants)
    ledger_tie = defaultdict(lambda: ZERO)
    invariant_sum = paid_sum = ZERO
    for (p1, f1), (p2, f2) in totals.values():
        report.opening_deferred += f1.deferred
        report.closing_deferred += f2.deferred
        report.new_deferred += f2.paid - f1.paid
        report.usage += f2.recognized - f1.recognized
        report.breakage += f2.breakage - f1.breakage
        report.refunds += f2.refunded - f1.refunded
        report.consumed_credits += p2.consumed - p1.consumed
        report.lapsed_credits += p2.lapsed - p1.lapsed
        report.refunded_credits += p2.refunded - p1.refunded
        invariant_sum += f2.recognized + f2.deferred + f2.breakage + f2.refunded
        paid_sum += f2.paid
        ledger_tie["remaining"] += p2.remaining
    _invoice_revenue(report)
    _promotion_cost(report)
    _to_minor_units(report)
    month_notes = CreditNote.objects.filter(currency=currency, issued_at__gte=start, issued_at__lt=end)
    notes = month_notes.aggregate(amount=Sum("amount"), credits=Sum("credits"))
    report.credit_notes = month_notes.count()
    paid_ids = [g.id for g in grants]
    by_type = dict(
        LedgerEntry.objects.filter(grant_id__in=paid_ids, created_at__gte=start, created_at__lt=end)
        .values_list("type").annotate(total=Sum("amount")).values_list("type", "total")
    )
    consumed_in_ledger = -sum((v for t, v in by_type.items() if t not in NOT_CONSUMPTION), ZERO)
    remaining_in_ledger = LedgerEntry.objects.filter(grant_id__in=paid_ids, created_at__lt=end).aggregate(
        total=Sum("amount"))["total"] or ZERO
    report.checks = [
        Check("Deferred roll-forward: start + payments − usage − breakage − refunds = end",
              report.opening_deferred + report.new_deferred - report.usage - report.breakage - report.refunds,
              report.closing_deferred),
        Check("Invariant 7 at month end: recognized + deferred + breakage + refunded = money paid",
              paid_sum, invariant_sum),
        Check("Refunds = credit notes issued in the month", notes["amount"] or ZERO, report.refunds),
        Check("Credit notes = credits × cost basis, rounded once (± one minor unit on a grant's last refund)",
              credit_notes_expected(month_notes), notes["amount"] or ZERO),
        Check("Refunded credits = ledger refund entries",
              -(by_type.get(LedgerEntry.Type.REFUND) or ZERO), report.refunded_credits),
        Check("Refunded credits = credit notes' credits", notes["credits"] or ZERO, report.refunded_credits),
        Check("Consumed credits = ledger usage, adjustment, overage and rollover entries", consumed_in_ledger,
              report.consumed_credits),
        Check("Expired and voided credits = ledger expiry and void entries",
              -sum((by_type.get(t) or ZERO for t in LAPSE_TYPES), ZERO), report.lapsed_credits),
        Check("Unused paid credits at month end = ledger balance of the paid grants", remaining_in_ledger,
              ledger_tie["remaining"]),
        Check("Overage + true-up revenue = overage and true-up lines of invoices issued in the month",
              report.invoiced.get(InvoiceLine.Kind.OVERAGE.label, ZERO)
              + report.invoiced.get(InvoiceLine.Kind.TRUE_UP.label, ZERO), report.overage + report.true_up),
        Check("Invoiced lines = subtotals of invoices issued in the month",
              Invoice.objects.filter(status__in=LIVE_INVOICE, currency=currency, issued_at__gte=start,
                                     issued_at__lt=end).aggregate(total=Sum("subtotal"))["total"] or ZERO,
              sum(report.invoiced.values(), ZERO)),
    ]
    return report


MONEY_FIELDS = ("opening_deferred", "new_deferred", "usage", "breakage", "refunds", "closing_deferred", "plan_fees",
                "overage", "true_up", "promotion_cost")


def _to_minor_units(report: RevenueReport) -> None:
    """Stored money carries 4 places; every figure here is whole minor units: show it so."""
    for name in MONEY_FIELDS:
        setattr(report, name, round_money(getattr(report, name), report.currency))
    report.invoiced = {label: round_money(amount, report.currency) for label, amount in report.invoiced.items()}


def credit_notes_expected(notes) -> Decimal:
    """What the notes should add up to: each note's credits × unit price rounded
    once, or its own amount when within one minor unit of that (the refund that
    empties a grant takes exactly the deferred rest)."""
    total = ZERO
    for credits, unit_price, amount, currency in notes.values_list("credits", "unit_price", "amount", "currency"):
        exact = round_money(credits * unit_price, currency)
        total += amount if abs(amount - exact) <= Decimal(1).scaleb(-minor_units(currency)) else exact
    return total


def _invoice_revenue(report: RevenueReport) -> None:
    start, end, currency = report.starts_at, report.ends_at, report.currency
    live = InvoiceLine.objects.filter(invoice__status__in=LIVE_INVOICE, invoice__currency=currency)
    issued = live.filter(invoice__issued_at__gte=start, invoice__issued_at__lt=end)
    by_kind = dict(issued.values_list("kind").annotate(total=Sum("amount")).values_list("kind", "total"))
    labels = dict(InvoiceLine.Kind.choices)
    report.invoiced = {labels[kind]: by_kind.get(kind) or ZERO for kind in InvoiceLine.Kind.values}
    report.overage = by_kind.get(InvoiceLine.Kind.OVERAGE) or ZERO
    report.true_up = by_kind.get(InvoiceLine.Kind.TRUE_UP) or ZERO
    # A period's invoice carries its fee lines and the proration credits of plan
    # changes or cancellation (credit_note lines): the net is spread over the period.
    fees = live.filter(
        Q(kind__in=(InvoiceLine.Kind.PLAN_FEE, InvoiceLine.Kind.CREDIT_NOTE),
          invoice__subscription_period__isnull=False, invoice__subscription_period__starts_at__lt=end,
          invoice__subscription_period__ends_at__gt=start)
        | Q(kind=InvoiceLine.Kind.PLAN_FEE, invoice__subscription_period__isnull=True, invoice__issued_at__gte=start,
            invoice__issued_at__lt=end)
    ).values_list("amount", "invoice__subscription_period__starts_at", "invoice__subscription_period__ends_at")
    for amount, period_start, period_end in fees:
        if period_start is None:
            report.plan_fees += amount
        else:
            report.plan_fees += (fee_recognized(amount, currency, period_start, period_end, end)
                                 - fee_recognized(amount, currency, period_start, period_end, start))


def fee_recognized(amount: Decimal, currency: str, starts_at: datetime, ends_at: datetime, at: datetime) -> Decimal:
    """Cumulative share of a period's fee recognized by ``at``: pro rata by time, rounded once."""
    if at <= starts_at:
        return ZERO
    if at >= ends_at:
        return amount
    elapsed = Decimal((at - starts_at) // _MICRO)
    return round_money(amount * elapsed / Decimal((ends_at - starts_at) // _MICRO), currency)


_MICRO = datetime.resolution


def _promotion_cost(report: RevenueReport) -> None:
    credits = -(LedgerEntry.objects.filter(
        grant__kind=CreditGrant.Kind.PROMOTIONAL, grant__currency=report.currency,
        created_at__gte=report.starts_at, created_at__lt=report.ends_at,
    ).exclude(type__in=NOT_CONSUMPTION).aggregate(total=Sum("amount"))["total"] or ZERO)
    report.promotional_credits = credits
    report.list_price = promotion_list_price(report.currency)
    report.promotion_cost = round_money(credits * report.list_price, report.currency) if report.list_price else ZERO


def report_currencies() -> list[str]:
    """Currencies with paid grants or invoices (the report's currency picker)."""
    currencies = set(paid_grants().values_list("currency", flat=True).distinct())
    currencies |= set(Invoice.objects.values_list("currency", flat=True).distinct())
    return sorted(currencies) or ["USD"]


# --- Nightly check --------------------------------------------------------------

CHECK_JOB = "revenue_check"
CHECK_BATCH = 500
MAX_LISTED = 100


@dataclass
class RevenueCheckResult:
    checked_grants: int = 0
    checked_reports: int = 0
    mismatches: list[str] = field(default_factory=list)
    alerted: bool = False

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.mismatches).encode()).hexdigest()[:16]

    def detail(self) -> dict:
        return {"ok": not self.mismatches, "checked_grants": self.checked_grants,
                "checked_reports": self.checked_reports, "mismatch_count": len(self.mismatches),
                "mismatches": self.mismatches[:MAX_LISTED], "fingerprint": self.fingerprint,
                "alerted": self.alerted}


def _grant_mismatches(grants: list[PaidGrant]) -> list[str]:
    """Invariant 7 and its ties to the ledger, the credit notes and the purchases for a batch of paid grants."""
    found = []
    ids = [g.id for g in grants]
    figures = figures_at(grants, [ALL_TIME])
    stored = dict(CreditGrant.objects.filter(pk__in=ids).values_list("pk", "remaining"))
    notes = defaultdict(list)
    for note in CreditNote.objects.filter(grant_id__in=ids).order_by("pk"):
        notes[note.grant_id].append(note)
    purchases = {row[0]: row[1:] for row in CreditGrant.objects.filter(pk__in=ids, purchase__isnull=False)
                 .values_list("pk", "price_paid", "purchase__total_price", "purchase__pk")}
    invoiced = dict(InvoiceLine.objects.filter(pack_purchase__grant_id__in=ids).exclude(
        invoice__status=Invoice.Status.VOID).values_list("pack_purchase__grant_id").annotate(total=Sum("amount"))
        .values_list("pack_purchase__grant_id", "total"))
    for grant in grants:
        [(position, f)] = figures[grant.id]
        label = f"grant #{grant.id} ({grant.customer})"
        if position.remaining != stored[grant.id]:
            found.append(f"{label}: ledger says {position.remaining} credits unused, the grant {stored[grant.id]}")
        if position.activated and position.consumed + position.lapsed + position.refunded + position.remaining \
                != grant.original:
            found.append(f"{label}: consumed + lapsed + refunded + unused credits ≠ original {grant.original}")
        note_credits = sum((n.credits for n in notes[grant.id]), ZERO)
        if note_credits != position.refunded:
            found.append(f"{label}: credit notes carry {note_credits} credits, refund entries {position.refunded}")
        for note in notes[grant.id]:
            exact = round_money(note.credits * note.unit_price, note.currency)
            if abs(note.amount - exact) > Decimal(1).scaleb(-minor_units(note.currency)):
                found.append(f"{label}: credit note {note.number} is {note.amount}, credits × price is {exact}")
        if grant.id in purchases:
            price_paid, total, purchase_id = purchases[grant.id]
            if price_paid != total:
                found.append(f"{label}: purchase #{purchase_id} totals {total}, the grant says {price_paid} paid")
            if grant.id in invoiced and invoiced[grant.id] != total:
                found.append(f"{label}: purchase #{purchase_id} totals {total}, invoiced {invoiced[grant.id]}")
        if f.recognized + f.deferred + f.breakage + f.refunded != f.paid:
            found.append(f"{label}: recognized + deferred + breakage + refunded ≠ paid {f.paid}")
        if min(f.recognized, f.deferred, f.breakage, f.refunded) < 0:
            found.append(f"{label}: a negative figure (recognized {f.recognized}, deferred {f.deferred}, "
                         f"breakage {f.breakage}, refunded {f.refunded})")
    return found


def revenue_check(*, now: datetime | None = None, progress=None) -> RevenueCheckResult:
    """Check invariant 7 for every paid grant (in batches, read-only) and the
    reconciliation of this month's and last month's report in every currency."""
    now = now or timezone.now()
    result = RevenueCheckResult()
    last_pk = 0
    while batch := _paid_grant_rows(after_pk=last_pk, limit=CHECK_BATCH):
        result.mismatches += _grant_mismatches(batch)
        result.checked_grants += len(batch)
        last_pk = batch[-1].id
        if progress:
            progress(len(batch))
    this_month = month_of(now)
    previous = (this_month[0] - 1, 12) if this_month[1] == 1 else (this_month[0], this_month[1] - 1)
    for currency in report_currencies():
        for year, month in (previous, this_month):
            report = revenue_report(year=year, month=month, currency=currency)
            result.checked_reports += 1
            result.mismatches += [
                f"{currency} {year}-{month:02d} report: {check.label}: expected {check.expected}, got {check.actual}"
                for check in report.checks if not check.ok]
    return result


def revenue_check_alert(result: RevenueCheckResult, *, now: datetime | None = None) -> bool:
    """Tell finance about a failed check: a ``revenue.mismatch`` outbox event and an
    email to CREDITDESK_FINANCE_ALERT_EMAIL after commit — once per day for the
    same set of differences, so a rerun does not alert again. True when alerted now."""
    from django.core.mail import send_mail

    from billing import events
    from billing.models import JobRun

    now = now or timezone.now()
    if not result.mismatches:
        return False
    day_start = datetime.combine(now.astimezone(reporting_zone()).date(), datetime.min.time(),
                                 tzinfo=reporting_zone())
    if JobRun.objects.filter(name=CHECK_JOB, started_at__gte=day_start, detail__fingerprint=result.fingerprint,
                             detail__alerted=True).exists():
        return False
    listed = "\n".join(f"- {line}" for line in result.mismatches[:MAX_LISTED])
    body = (f"The nightly revenue check found {len(result.mismatches)} difference(s) "
            f"between revenue, the ledger, the credit notes and the invoices:\n\n{listed}\n\n"
            "The revenue report in the admin shows the reconciliation month by month.")
    with transaction.atomic():
        events.publish("revenue.mismatch", {"count": len(result.mismatches), "fingerprint": result.fingerprint,
                                            "mismatches": result.mismatches[:MAX_LISTED]})
        transaction.on_commit(lambda: send_mail(
            f"Revenue check: {len(result.mismatches)} difference(s) to look at", body, None,
            [settings.CREDITDESK_FINANCE_ALERT_EMAIL]))
    return True


def revenue_check_latest():
    """The last finished nightly check (for the admin banner), or None."""
    from billing.models import JobRun

    return JobRun.objects.filter(name=CHECK_JOB).exclude(status="running").order_by("-started_at", "-pk").first()
