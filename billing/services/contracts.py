"""Enterprise contracts with true-up (DESIGN.md §6).

A contract commits a customer to credits per year (or to spend per year) at a
negotiated price on one pooled wallet that all its teams consume from:

- **Price**: the list price per credit, or the volume tier the yearly
  commitment reaches (``ContractPriceTier``), less the discount; a price
  amendment replaces the list price from its date. ``contract_price`` is the
  one place that computes it (``round_rate``).
- **Instalments**: upfront (one per contract year) or quarterly. Each is
  released on its due date as an issued invoice with one ``contract`` line and
  a ``contract`` grant of its credits whose ``per_unit_cost_basis`` is the
  effective price, billed exactly ``round_money(credits × cost basis)`` — so
  money paid = what revenue recognition reads off the grant. The credits expire
  at the end of their contract year. A new grant repays outstanding overage
  first (``ledger.settle_overage``), like every grant.
- **Overdraft**: activation puts the wallet on ``overdraft`` with a credit limit
  (the contract's, or the yearly commitment × ``CREDITDESK_CONTRACT_OVERDRAFT_FACTOR``),
  so consumption above what was released runs as overage instead of failing.
- **True-up**: at each true-up date (annual by default, or quarterly) the
  overage then outstanding is settled by a paid-for ``contract`` grant
  (``overage_settled`` entries) and billed on an issued invoice with one
  ``true_up`` line at the true-up price (the contract's, else the effective
  price). Instalments due before the date are released first; an instalment
  waits for an earlier true-up, so a new term's credits never pay last term's
  overage.
- **Statement** (``contract_statement``, read-only): committed, consumed to
  date, the burn rate, projected consumption at the true-up date and at term
  end, and the projected true-up amount.
- **Renewal and amendments** (the CRM calls these): renewal extends the term,
  schedules its instalments and true-ups, and rolls the capped share of the
  unused contract credits into a ``rollover`` grant (``rollover_out`` /
  ``rollover_in`` entries, balance unchanged); an amendment adds credits
  mid-term (a grant and an invoice) or changes the price from a date.

Every writer runs in one transaction, takes the contract's row lock first
(``lock_contract``; then the instalment or true-up row, then invoices, grants
and the wallet in the order of ``billing.services.locks`` — except that a
true-up reads the overage under the wallet lock before its invoice is
numbered, as a plan period close does), is idempotent (instalments and
true-ups once each; amendments per ``idempotency_key``), audits, publishes a
``contract.*`` event, and raises ``BillingError``.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from billing import events
from billing.errors import Conflict, IdempotencyConflict, InvalidRequest, NotFound
from billing.models import (
    Contract,
    ContractAmendment,
    ContractInstalment,
    ContractPriceTier,
    CreditGrant,
    Customer,
    InvoiceLine,
    LedgerEntry,
    TrueUp,
    Wallet,
)
from billing.numbers import MAX_CREDITS, MAX_RATE, ZERO, round_credits, round_money, round_rate
from billing.services.audit import audit_record
from billing.services.grants import default_wallet, grant_create
from billing.services.invoices import invoice_add_line, invoice_create_draft, invoice_issue
from billing.services.ledger import Movement, append_entries
from billing.services.locks import lock_grants, lock_wallet
from billing.services.plans import add_months

HUNDRED = Decimal(100)
DAY_SECONDS = Decimal(86400)
# An instalment released after its contract year ended (the job was down) still
# repays the overage first; what is left of it expires this much later.
LATE_RELEASE_GRACE = timedelta(hours=1)
# Ledger entry types that count as consumption (a reversal gives some back).
CONSUMPTION_TYPES = (LedgerEntry.Type.USAGE, LedgerEntry.Type.OVERAGE, LedgerEntry.Type.REVERSAL)


def lock_contract(contract_id: int) -> Contract:
    try:
        return (Contract.objects.select_for_update(of=("self",)).select_related("customer", "wallet")
                .get(pk=contract_id))
    except Contract.DoesNotExist:
        raise NotFound(f"No contract #{contract_id}.") from None


def plus_months(contract: Contract, months: int) -> datetime:
    """The contract start moved ``months`` on in the customer's time zone (same
    local time of day; a start on the 31st lands on shorter months' last day)."""
    tz = zoneinfo.ZoneInfo(contract.customer.timezone)
    local = contract.starts_at.astimezone(tz)
    moved = add_months(local.date(), months)
    return datetime.combine(moved, local.timetz().replace(tzinfo=None), tzinfo=tz)


# --- Prices ---------------------------------------------------------------------


def _discounted(contract: Contract, list_price: Decimal) -> Decimal:
    return round_rate(list_price * (HUNDRED - contract.discount_percent) / HUNDRED)


def _tier_list_price(contract: Contract, tiers: list[ContractPriceTier]) -> Decimal:
    """The list price the yearly commitment earns: the highest tier it reaches.
    A spend commitment reaches a tier when the spend buys its minimum at its price."""
    for tier in sorted(tiers, key=lambda t: t.min_credits, reverse=True):
        if contract.commitment == Contract.Commitment.SPEND:
            price = _discounted(contract, tier.price_per_credit)
            if price > 0 and contract.committed_spend / price >= tier.min_credits:
                return tier.price_per_credit
        elif contract.committed_credits >= tier.min_credits:
            return tier.price_per_credit
    return contract.list_price


def contract_price(contract: Contract, *, at: datetime) -> Decimal:
    """Effective money per credit at ``at``: the latest price amendment's list
    price in effect then (else the tier price, else the list price), less the discount."""
    change = (contract.amendments.filter(kind=ContractAmendment.Kind.PRICE_CHANGE, list_price__isnull=False,
                                         effective_at__lte=at).order_by("-effective_at", "-pk").first())
    if change is not None:
        return _discounted(contract, change.list_price)
    return _discounted(contract, _tier_list_price(contract, list(contract.tiers.all())))


def contract_true_up_price(contract: Contract, *, at: datetime) -> Decimal:
    """Money per overage credit at a true-up on ``at``: the latest amended
    true-up price in effect, else the contract's, else the effective price."""
    change = (contract.amendments.filter(kind=ContractAmendment.Kind.PRICE_CHANGE, true_up_price__isnull=False,
                                         effective_at__lte=at).order_by("-effective_at", "-pk").first())
    if change is not None:
        return change.true_up_price
    if contract.true_up_price is not None:
        return contract.true_up_price
    return contract_price(contract, at=at)


# --- Creating and activating ------------------------------------------------------


def contract_create(
    *, customer: Customer, starts_at: datetime, list_price: Decimal, term_months: int = 12,
    committed_credits: Decimal | None = None, committed_spend: Decimal | None = None,
    tiers: list[tuple[Decimal, Decimal]] = (), discount_percent: Decimal = ZERO, currency: str | None = None,
    payment_schedule: str = Contract.PaymentSchedule.QUARTERLY, true_up_cadence: str = Contract.Cadence.ANNUAL,
    true_up_price: Decimal | None = None, rollover_percent: Decimal = ZERO, credit_limit: Decimal | None = None,
    wallet: Wallet | None = None, reference: str = "", actor=None, actor_label: str = "",
) -> Contract:
    """Record a draft contract on the customer's pooled wallet (default: its
    default wallet) with its volume tiers as ``(min_credits, list price per
    credit)``. Exactly one of ``committed_credits`` / ``committed_spend`` (per
    year). Nothing is granted or billed until ``contract_activate``.
    Raises InvalidRequest for inconsistent terms, Conflict if the wallet already
    has a draft or active contract."""
    wallet = wallet or default_wallet(customer)
    if (committed_credits is None) == (committed_spend is None):
        raise InvalidRequest("Commit to credits or to spend per year (one of them).",
                             details={"committed_credits": "give this or committed_spend"})
    contract = Contract(
        customer=customer, wallet=wallet, reference=reference, starts_at=starts_at, term_months=term_months,
        commitment=Contract.Commitment.CREDITS if committed_credits is not None else Contract.Commitment.SPEND,
        committed_credits=round_credits(committed_credits or ZERO),
        committed_spend=round_money(committed_spend or ZERO, currency or customer.currency),
        currency=currency or customer.currency, list_price=round_rate(list_price),
        discount_percent=Decimal(discount_percent), payment_schedule=payment_schedule,
        true_up_cadence=true_up_cadence, true_up_price=None if true_up_price is None else round_rate(true_up_price),
        rollover_percent=Decimal(rollover_percent), credit_limit=credit_limit,
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    contract.ends_at = plus_months(contract, term_months)
    contract_validate(contract)
    for min_credits, price in tiers:
        if not (ZERO <= Decimal(min_credits) <= MAX_CREDITS and ZERO <= Decimal(price) <= MAX_RATE):
            raise InvalidRequest("Tiers take a minimum of credits and a price, neither negative.",
                                 details={"tiers": "(min_credits >= 0, price >= 0)"})
    try:
        with transaction.atomic():
            contract.save()
            ContractPriceTier.objects.bulk_create([
                ContractPriceTier(contract=contract, min_credits=round_credits(m), price_per_credit=round_rate(p))
                for m, p in tiers])
            audit_record(actor=actor, actor_label=actor_label, action="contract.create", obj=contract,
                         changes={"commitment": contract.commitment, "committed_credits": contract.committed_credits,
                                  "committed_spend": contract.committed_spend, "list_price": contract.list_price,
                                  "tiers": [[str(m), str(p)] for m, p in tiers]})
    except IntegrityError:
        raise Conflict(f"Wallet {wallet} already has a live contract.", details={"wallet": wallet.pk}) from None
    return contract


def contract_validate(contract: Contract) -> None:
    """The model's single-row rules as an InvalidRequest naming the field."""
    from django.core.exceptions import ValidationError

    try:
        contract.full_clean(exclude=["customer", "wallet", "created_by"])
    except ValidationError as error:
        details = {field: "; ".join(messages) for field, messages in error.message_dict.items()}
        raise InvalidRequest("The contract's terms are not valid: " + "; ".join(
            f"{field}: {message}" for field, message in details.items()), details=details) from None


def _annual_credits(contract: Contract) -> Decimal:
    if contract.commitment == Contract.Commitment.SPEND:
        price = contract_price(contract, at=contract.starts_at)
        if price <= 0:
            raise InvalidRequest("A spend commitment needs a price per credit above zero.",
                                 details={"list_price": "must be > 0 for a spend commitment"})
        return round_credits(contract.committed_spend / price)
    return contract.committed_credits


def _schedule(contract: Contract, *, from_month: int, to_month: int) -> None:
    """Create the instalments and true-ups of contract months [from_month, to_month)."""
    annual = contract.committed_credits
    step = 3 if contract.payment_schedule == Contract.PaymentSchedule.QUARTERLY else 12
    index = contract.instalments.count()
    instalments = []
    for month in range(from_month, to_month, step):
        span = min(step, to_month - month)
        year_end = min((month // 12 + 1) * 12, to_month)
        credits = round_credits(annual * span / 12)
        if credits > 0:
            instalments.append(ContractInstalment(
                contract=contract, index=index, due_at=plus_months(contract, month),
                expires_at=plus_months(contract, year_end), credits=credits))
            index += 1
    ContractInstalment.objects.bulk_create(instalments)
    step = 3 if contract.true_up_cadence == Contract.Cadence.QUARTERLY else 12
    TrueUp.objects.bulk_create([
        TrueUp(contract=contract, period_start=plus_months(contract, month),
               period_end=plus_months(contract, min(month + step, to_month)),
               committed=round_credits(annual * min(step, to_month - month) / 12))
        for month in range(from_month, to_month, step)])


def contract_activate(*, contract_id: int, now: datetime | None = None, actor=None,
                      actor_label: str = "") -> Contract:
    """Activate a draft: fix the yearly credits (a spend commitment buys them at
    the effective price), schedule the instalments and true-ups of the term, put
    the pooled wallet on ``overdraft`` with the contract's credit limit, and
    release the instalments already due. Idempotent for an active contract;
    Conflict for an ended or canceled one."""
    now = now or timezone.now()
    with transaction.atomic():
        contract = lock_contract(contract_id)
        if contract.status == Contract.Status.ACTIVE:
            return contract
        if contract.status != Contract.Status.DRAFT:
            raise Conflict(f"{contract} is {contract.status}; only drafts can be activated.")
        contract_validate(contract)
        contract.committed_credits = _annual_credits(contract)
        if contract.committed_credits <= 0:
            raise InvalidRequest("The commitment buys no credits at this price.",
                                 details={"committed_spend": "too small for the price"})
        if contract.credit_limit is None:
            contract.credit_limit = round_credits(contract.committed_credits * overdraft_factor())
        contract.status, contract.activated_at = Contract.Status.ACTIVE, now
        contract.save(update_fields=["committed_credits", "credit_limit", "status", "activated_at"])
        _schedule(contract, from_month=0, to_month=contract.term_months)
        wallet = lock_wallet(contract.wallet_id)
        before = (wallet.policy, wallet.credit_limit)
        wallet.policy, wallet.credit_limit = Wallet.Policy.OVERDRAFT, contract.credit_limit
        wallet.save(update_fields=["policy", "credit_limit"])
        audit_record(actor=actor, actor_label=actor_label, action="contract.activate", obj=contract,
                     changes={"committed_credits": contract.committed_credits,
                              "wallet_policy": f"{before[0]} → overdraft",
                              "credit_limit": f"{before[1]} → {contract.credit_limit}"})
        events.publish("contract.activated", {"contract": contract.pk, "customer": contract.customer_id,
                                              "wallet": contract.wallet_id})
        _run_due(contract, now=now, actor=actor, actor_label=actor_label)
    return contract


def contract_cancel(*, contract_id: int, reason: str, actor=None, actor_label: str = "") -> Contract:
    """Cancel a draft that will not be signed (its wallet is free for another
    contract). Nothing was granted or billed, so nothing is undone. Idempotent
    for a canceled draft; Conflict for an active or ended contract, which runs
    to its term end (a renewal or an amendment changes it)."""
    if not reason.strip():
        raise InvalidRequest("Say why the contract is canceled.", details={"reason": "required"})
    with transaction.atomic():
        contract = lock_contract(contract_id)
        if contract.status == Contract.Status.CANCELED:
            return contract
        if contract.status != Contract.Status.DRAFT:
            raise Conflict(f"{contract} is {contract.status}; only drafts are canceled.")
        contract.status = Contract.Status.CANCELED
        contract.save(update_fields=["status"])
        audit_record(actor=actor, actor_label=actor_label, action="contract.cancel", obj=contract,
                     changes={"reason": reason})
        events.publish("contract.canceled", {"contract": contract.pk, "customer": contract.customer_id})
    return contract


def overdraft_factor() -> Decimal:
    return Decimal(str(getattr(settings, "CREDITDESK_CONTRACT_OVERDRAFT_FACTOR", "1")))


# --- Instalments and true-ups -----------------------------------------------------


def _bill(contract: Contract, *, kind: str, description: str, credits: Decimal, unit_price: Decimal,
          actor, actor_label: str):
    invoice = invoice_create_draft(customer=contract.customer, currency=contract.currency, actor=actor,
                                   actor_label=actor_label, memo=str(contract))
    invoice_add_line(invoice_id=invoice.pk, kind=kind, description=description, quantity=credits,
                     unit_price=unit_price, actor=actor, actor_label=actor_label)
    return invoice


def _contract_grant(contract: Contract, *, credits: Decimal, unit_price: Decimal, key: str, reason: str,
                    effective_at: datetime, expires_at: datetime | None, actor, actor_label: str) -> CreditGrant:
    """A ``contract`` grant of ``credits`` paid at ``unit_price`` each: cost basis
    exactly the unit price, price paid exactly its rounded product."""
    grant = grant_create(
        wallet=contract.wallet, kind=CreditGrant.Kind.CONTRACT, source=CreditGrant.Source.CONTRACT,
        amount=credits, price_paid=round_money(credits * unit_price, contract.currency), currency=contract.currency,
        effective_at=effective_at, expires_at=expires_at, reason=reason[:500], requested_by=actor,
        actor_label=actor_label or "contract", require_approval=False, idempotency_key=key,
    )
    if grant.per_unit_cost_basis != unit_price:
        CreditGrant.objects.filter(pk=grant.pk).update(per_unit_cost_basis=unit_price)
        grant.per_unit_cost_basis = unit_price
    return grant


def _release(contract: Contract, instalment: ContractInstalment, *, now: datetime, actor, actor_label: str) -> None:
    price = contract_price(contract, at=instalment.due_at)
    credits = instalment.credits
    label = f"{contract}: instalment {instalment.index + 1}, {credits.normalize():f} credits"
    invoice = _bill(contract, kind=InvoiceLine.Kind.CONTRACT, description=label, credits=credits,
                    unit_price=price, actor=actor, actor_label=actor_label)
    # Issued (the year's number counter) before the grant locks the wallet: the
    # order invoice_issue itself uses when a paid invoice activates grants.
    invoice = invoice_issue(invoice_id=invoice.pk, now=now, actor=actor, actor_label=actor_label)
    grant = _contract_grant(
        contract, credits=credits, unit_price=price, key=f"contract:{contract.pk}:instalment:{instalment.index}",
        reason=label, effective_at=min(instalment.due_at, now),
        expires_at=max(instalment.expires_at, now + LATE_RELEASE_GRACE), actor=actor, actor_label=actor_label)
    instalment.unit_price, instalment.amount = price, invoice.subtotal
    instalment.invoice, instalment.grant, instalment.released_at = invoice, grant, now
    instalment.save(update_fields=["unit_price", "amount", "invoice", "grant", "released_at"])
    audit_record(actor=actor, actor_label=actor_label, action="contract.instalment_release", obj=contract,
                 changes={"instalment": instalment.index, "credits": credits, "unit_price": price,
                          "invoice": invoice.number, "grant": grant.pk})
    events.publish("contract.instalment_released", {"contract": contract.pk, "instalment": instalment.pk,
                                                    "invoice": invoice.pk, "grant": grant.pk})


def _consumed(contract: Contract, start: datetime, end: datetime) -> Decimal:
    moved = (LedgerEntry.objects.filter(wallet_id=contract.wallet_id, type__in=CONSUMPTION_TYPES,
                                        created_at__gte=start, created_at__lt=end)
             .aggregate(total=Sum("amount"))["total"] or ZERO)
    return -moved


def _added_credits(contract: Contract, start: datetime, end: datetime) -> Decimal:
    return contract.amendments.filter(kind=ContractAmendment.Kind.ADD_CREDITS, effective_at__gte=start,
                                      effective_at__lt=end).aggregate(t=Sum("credits"))["t"] or ZERO


def _settle(contract: Contract, true_up: TrueUp, *, now: datetime, actor, actor_label: str) -> None:
    for instalment in contract.instalments.filter(released_at__isnull=True, due_at__lt=true_up.period_end,
                                                  due_at__lte=now).order_by("index"):
        _release(contract, instalment, now=now, actor=actor, actor_label=actor_label)
    price = contract_true_up_price(contract, at=true_up.period_end)
    overage = lock_wallet(contract.wallet_id).overage
    label = f"{contract}: true-up {true_up.period_start:%Y-%m-%d} – {true_up.period_end:%Y-%m-%d}"
    invoice = grant = None
    if overage > 0:
        invoice = _bill(contract, kind=InvoiceLine.Kind.TRUE_UP, description=f"{label}, overage credits",
                        credits=overage, unit_price=price, actor=actor, actor_label=actor_label)
        grant = _contract_grant(
            contract, credits=overage, unit_price=price, reason=f"{label}: settles the overage",
            key=f"contract:{contract.pk}:true-up:{true_up.period_end:%Y%m%dT%H%M}", effective_at=now,
            expires_at=None, actor=actor, actor_label=actor_label)
        invoice = invoice_issue(invoice_id=invoice.pk, now=now, actor=actor, actor_label=actor_label)
    true_up.committed = round_credits(
        contract.committed_credits * _months_between(contract, true_up.period_start, true_up.period_end) / 12
        + _added_credits(contract, true_up.period_start, true_up.period_end))
    true_up.consumed = _consumed(contract, true_up.period_start, true_up.period_end)
    true_up.overage_credits, true_up.unit_price = overage, price
    true_up.amount = invoice.subtotal if invoice is not None else ZERO
    true_up.invoice, true_up.grant, true_up.settled_at = invoice, grant, now
    true_up.save(update_fields=["committed", "consumed", "overage_credits", "unit_price", "amount", "invoice",
                                "grant", "settled_at"])
    audit_record(actor=actor, actor_label=actor_label, action="contract.true_up", obj=contract,
                 changes={"true_up": true_up.period_end.isoformat(), "overage_credits": overage,
                          "unit_price": price, "amount": true_up.amount,
                          "invoice": invoice.number if invoice else None})
    events.publish("contract.true_up_settled", {"contract": contract.pk, "true_up": true_up.pk,
                                                "invoice": invoice.pk if invoice else None,
                                                "overage_credits": str(overage), "amount": str(true_up.amount)})
    if true_up.period_end >= contract.ends_at and not contract.true_ups.filter(settled_at__isnull=True).exists():
        _end(contract, now=now, actor=actor, actor_label=actor_label)


def _months_between(contract: Contract, start: datetime, end: datetime) -> int:
    month = 0
    while plus_months(contract, month) < start:
        month += 1
    first = month
    while plus_months(contract, month) < end:
        month += 1
    return month - first


def _end(contract: Contract, *, now: datetime, actor, actor_label: str) -> None:
    """The last true-up is settled: the contract ends and its wallet stops borrowing."""
    contract.status, contract.ended_at = Contract.Status.ENDED, now
    contract.save(update_fields=["status", "ended_at"])
    wallet = lock_wallet(contract.wallet_id)
    before, wallet.credit_limit = wallet.credit_limit, ZERO
    wallet.save(update_fields=["credit_limit"])
    audit_record(actor=actor, actor_label=actor_label, action="contract.end", obj=contract,
                 changes={"credit_limit": f"{before} → 0"})
    events.publish("contract.ended", {"contract": contract.pk, "customer": contract.customer_id})


def _next_due(contract: Contract, now: datetime) -> tuple[str, object] | None:
    """The earliest due step: a true-up before an instalment due the same moment."""
    true_up = contract.true_ups.filter(settled_at__isnull=True, period_end__lte=now).order_by("period_end").first()
    instalment = (contract.instalments.filter(released_at__isnull=True, due_at__lte=now).order_by("index")
                  .first())
    if true_up is not None and (instalment is None or true_up.period_end <= instalment.due_at):
        return "true_up", true_up
    if instalment is not None:
        return "instalment", instalment
    return None


def _run_due(contract: Contract, *, now: datetime, actor, actor_label: str) -> int:
    steps = 0
    while contract.status == Contract.Status.ACTIVE and (step := _next_due(contract, now)) is not None:
        kind, row = step
        if kind == "true_up":
            _settle(contract, row, now=now, actor=actor, actor_label=actor_label)
        else:
            _release(contract, row, now=now, actor=actor, actor_label=actor_label)
        steps += 1
    return steps


def _lock_step(model, step_id: int):
    """Lock a contract, then one of its instalments or true-ups (that order,
    like every contract service). A step already done is returned whatever the
    contract's status; NotFound for an unknown step, Conflict for a step not
    done on a contract that is not active."""
    name = model._meta.verbose_name
    contract_id = model.objects.filter(pk=step_id).values_list("contract_id", flat=True).first()
    if contract_id is None:
        raise NotFound(f"No {name} #{step_id}.")
    contract = lock_contract(contract_id)
    step = model.objects.select_for_update().get(pk=step_id)
    done = step.released_at if model is ContractInstalment else step.settled_at
    if done is None and contract.status != Contract.Status.ACTIVE:
        raise Conflict(f"{contract} is {contract.status}; its {name}s are not run.")
    return contract, step


def contract_instalment_release(*, instalment_id: int, now: datetime | None = None, actor=None,
                                actor_label: str = "") -> ContractInstalment:
    """Release one instalment whose due date has passed: an issued invoice with
    one ``contract`` line and a ``contract`` grant of its credits at the
    effective price. Idempotent: a released instalment is returned as is (a
    killed run rolls back whole). Conflict before its due date, on an inactive
    contract, or while an earlier true-up is unsettled."""
    now = now or timezone.now()
    with transaction.atomic():
        contract, instalment = _lock_step(ContractInstalment, instalment_id)
        if instalment.released_at is not None:
            return instalment
        if instalment.due_at > now:
            raise Conflict(f"{instalment} is not due yet.", details={"due_at": instalment.due_at.isoformat()})
        if contract.true_ups.filter(settled_at__isnull=True, period_end__lte=instalment.due_at).exists():
            raise Conflict(f"Settle {contract}'s earlier true-up first: its overage must not eat this instalment.")
        _release(contract, instalment, now=now, actor=actor, actor_label=actor_label)
    return instalment


def contract_true_up_settle(*, true_up_id: int, now: datetime | None = None, actor=None,
                            actor_label: str = "") -> TrueUp:
    """Settle one true-up whose date has passed: release the instalments due
    before it, then settle the wallet's outstanding overage with a paid-for
    ``contract`` grant (``overage_settled`` entries) billed on an issued invoice
    with one ``true_up`` line (overage × true-up price); record committed and
    consumed credits of the period. No overage: settled with no invoice. The
    last true-up of the term ends the contract. Idempotent per contract and
    date: a settled true-up is returned as is; a killed run rolls back whole.
    Conflict before the date or on an inactive contract."""
    now = now or timezone.now()
    with transaction.atomic():
        contract, true_up = _lock_step(TrueUp, true_up_id)
        if true_up.settled_at is not None:
            return true_up
        if true_up.period_end > now:
            raise Conflict(f"{true_up} is not due until {true_up.period_end:%Y-%m-%d %H:%M}.",
                           details={"period_end": true_up.period_end.isoformat()})
        earlier = contract.true_ups.filter(settled_at__isnull=True, period_end__lt=true_up.period_end).first()
        if earlier is not None:
            raise Conflict(f"Settle {earlier} first.")
        _settle(contract, true_up, now=now, actor=actor, actor_label=actor_label)
    return true_up


def contract_run_due(*, contract_id: int, now: datetime | None = None, actor=None, actor_label: str = "") -> int:
    """Release every due instalment and settle every due true-up of one
    contract, in date order (a true-up before an instalment due the same
    moment), in one transaction. Idempotent. Returns how many steps ran."""
    now = now or timezone.now()
    with transaction.atomic():
        contract = lock_contract(contract_id)
        if contract.status != Contract.Status.ACTIVE:
            return 0
        return _run_due(contract, now=now, actor=actor, actor_label=actor_label)


def contracts_run_due(*, now: datetime | None = None, progress=None) -> int:
    """The beat job: ``contract_run_due`` for every active contract with a step
    due, one transaction per contract, so a killed run loses nothing and a
    rerun finishes the rest once. Returns how many steps ran."""
    now = now or timezone.now()
    due = Contract.objects.filter(status=Contract.Status.ACTIVE).filter(
        Q(instalments__released_at__isnull=True, instalments__due_at__lte=now)
        | Q(true_ups__settled_at__isnull=True, true_ups__period_end__lte=now)).distinct()
    steps = 0
    last_pk = 0
    while ids := list(due.filter(pk__gt=last_pk).order_by("pk").values_list("pk", flat=True)[:200]):
        for contract_id in ids:
            steps += contract_run_due(contract_id=contract_id, now=now, actor_label="contracts job")
            if progress:
                progress(1)
        last_pk = ids[-1]
    return steps


# --- Renewal and amendments (called by the CRM) --------------------------------


def _existing_amendment(contract: Contract, idempotency_key: str | None, kind: str) -> ContractAmendment | None:
    if not idempotency_key:
        return None
    existing = contract.amendments.filter(idempotency_key=idempotency_key).first()
    if existing is not None and existing.kind != kind:
        raise IdempotencyConflict(f"Idempotency key {idempotency_key!r} was used for a {existing.kind}.",
                                  details={"idempotency_key": idempotency_key})
    return existing


def _live(contract: Contract, now: datetime) -> None:
    if contract.status != Contract.Status.ACTIVE:
        raise Conflict(f"{contract} is {contract.status}; only active contracts change.")
    if now >= contract.ends_at:
        raise Conflict(f"{contract} ended its term on {contract.ends_at:%Y-%m-%d}.")


def _lock_for_amendment(
    contract_id: int, idempotency_key: str | None, kind: str, now: datetime, *,
    effective_at: datetime | None = None, outside_term: str = "",
) -> tuple[Contract, ContractAmendment | None]:
    """Lock the contract and return it with the amendment ``idempotency_key``
    already made (a rerun returns that one). Before a new amendment: Conflict
    unless the contract is live, InvalidRequest ``outside_term`` when
    ``effective_at`` is given and not within the term."""
    contract = lock_contract(contract_id)
    existing = _existing_amendment(contract, idempotency_key, kind)
    if existing is None:
        _live(contract, now)
        if effective_at is not None and not contract.starts_at <= effective_at < contract.ends_at:
            raise InvalidRequest(outside_term, details={"effective_at": "between the contract's start and end"})
    return contract, existing


def _contract_year_end(contract: Contract, at: datetime) -> datetime:
    month = 12
    while plus_months(contract, month) <= at:
        month += 12
    return min(plus_months(contract, month), contract.ends_at)


def contract_renew(
    *, contract_id: int, months: int | None = None, list_price: Decimal | None = None,
    idempotency_key: str | None = None, now: datetime | None = None, actor=None, actor_label: str = "",
) -> ContractAmendment:
    """Renew an active contract before its term ends: the term grows by
    ``months`` (default: the original term), the new months get their
    instalments and true-ups, an optional new list price applies from the old
    end, and the contract's unused credits usable now roll over capped at its
    ``rollover_percent``: ``rollover_out`` entries on the contract's grants and
    one ``rollover_in`` on a new ``rollover`` grant usable to the new end (the
    balance does not move; what is not rolled keeps its expiry). Recorded as a
    ``renewal`` amendment. Idempotent per ``idempotency_key``; Conflict on an
    ended or inactive contract."""
    now = now or timezone.now()
    with transaction.atomic():
        contract, existing = _lock_for_amendment(contract_id, idempotency_key, ContractAmendment.Kind.RENEWAL, now)
        if existing is not None:
            return existing
        months = contract.term_months if months is None else months
        step = 3 if Contract.Cadence.QUARTERLY in (contract.payment_schedule, contract.true_up_cadence) else 1
        if not 1 <= months <= 120 or months % step:
            raise InvalidRequest("Renew for 1 to 120 months (whole quarters on quarterly schedules).",
                                 details={"months": "1..120, whole quarters when quarterly"})
        old_end, old_months = contract.ends_at, _term_months(contract)
        amendment = ContractAmendment.objects.create(
            contract=contract, kind=ContractAmendment.Kind.RENEWAL, effective_at=old_end, months=months,
            list_price=None if list_price is None else round_rate(list_price), idempotency_key=idempotency_key,
            note=f"Renewed for {months} months", created_by=_user(actor))
        if list_price is not None:
            ContractAmendment.objects.create(
                contract=contract, kind=ContractAmendment.Kind.PRICE_CHANGE, effective_at=old_end,
                list_price=round_rate(list_price), note="Price of the renewed term", created_by=_user(actor))
        contract.ends_at = plus_months(contract, old_months + months)
        contract.save(update_fields=["ends_at"])
        _schedule(contract, from_month=old_months, to_month=old_months + months)
        rolled = _roll_over(contract, amendment, now=now)
        audit_record(actor=actor, actor_label=actor_label, action="contract.renew", obj=contract,
                     changes={"ends_at": f"{old_end.isoformat()} → {contract.ends_at.isoformat()}",
                              "rolled_over": rolled, "list_price": list_price})
        events.publish("contract.renewed", {"contract": contract.pk, "ends_at": contract.ends_at.isoformat(),
                                            "rolled_over": str(rolled)})
    return amendment


def _term_months(contract: Contract) -> int:
    """Months from the start to the current end: the term and its renewals."""
    months = contract.term_months
    while plus_months(contract, months) < contract.ends_at:
        months += 1
    return months


def _roll_over(contract: Contract, amendment: ContractAmendment, *, now: datetime) -> Decimal:
    if contract.rollover_percent <= 0:
        return ZERO
    candidates = CreditGrant.objects.filter(
        wallet_id=contract.wallet_id, kind__in=(CreditGrant.Kind.CONTRACT, CreditGrant.Kind.ROLLOVER),
        idempotency_key__startswith=f"contract:{contract.pk}:").usable(at=now)
    locked = lock_grants(candidates.values_list("pk", flat=True))
    wallet = lock_wallet(contract.wallet_id)
    takes = [(grant, round_credits(grant.remaining * contract.rollover_percent / HUNDRED))
             for grant in locked.values()]
    takes = [(grant, amount) for grant, amount in takes if amount > 0]
    total = sum((amount for _, amount in takes), ZERO)
    if total <= 0:
        return ZERO
    basis = round_rate(sum((amount * grant.per_unit_cost_basis for grant, amount in takes), ZERO) / total)
    reference = f"contract:{contract.pk}:renewal:{amendment.pk}"
    rolled = CreditGrant.objects.create(
        wallet=wallet, kind=CreditGrant.Kind.ROLLOVER, source=CreditGrant.Source.CONTRACT, original_amount=total,
        remaining=total, per_unit_cost_basis=basis, currency=contract.currency, effective_at=now,
        expires_at=contract.ends_at, reason=f"{contract}: {contract.rollover_percent}% of unused credits rolled "
                                            f"into the renewed term", idempotency_key=reference)
    memo = f"Renewal of {contract}: unused credits rolled over"
    movements = []
    for grant, amount in takes:
        grant.remaining -= amount
        CreditGrant.objects.filter(pk=grant.pk).update(remaining=grant.remaining)
        movements.append(Movement(type=LedgerEntry.Type.ROLLOVER_OUT, amount=-amount, grant=grant,
                                  reference=reference, memo=memo))
    movements.append(Movement(type=LedgerEntry.Type.ROLLOVER_IN, amount=total, grant=rolled, reference=reference,
                              memo=memo))
    append_entries(wallet=wallet, movements=movements)
    amendment.credits, amendment.grant = total, rolled
    amendment.save(update_fields=["credits", "grant"])
    return total


def contract_add_credits(
    *, contract_id: int, credits: Decimal, effective_at: datetime | None = None, note: str = "",
    idempotency_key: str | None = None, now: datetime | None = None, actor=None, actor_label: str = "",
) -> ContractAmendment:
    """Amend an active contract with extra credits from ``effective_at`` (default
    now, not later than the term end): a ``contract`` grant at the effective
    price then, usable to the end of that contract year, billed at once on an
    issued invoice with one ``contract`` line. Recorded as an ``add_credits``
    amendment; idempotent per ``idempotency_key``. Conflict on an inactive
    contract, InvalidRequest for a non-positive amount."""
    now = now or timezone.now()
    credits = round_credits(credits)
    if not ZERO < credits <= MAX_CREDITS:
        raise InvalidRequest("Add more than zero credits.", details={"credits": "must be > 0"})
    effective_at = effective_at or now
    with transaction.atomic():
        contract, existing = _lock_for_amendment(
            contract_id, idempotency_key, ContractAmendment.Kind.ADD_CREDITS, now, effective_at=effective_at,
            outside_term="Added credits take effect within the term.")
        if existing is not None:
            return existing
        price = contract_price(contract, at=effective_at)
        amendment = ContractAmendment.objects.create(
            contract=contract, kind=ContractAmendment.Kind.ADD_CREDITS, effective_at=effective_at, credits=credits,
            note=note[:500], idempotency_key=idempotency_key, created_by=_user(actor))
        label = f"{contract}: {credits.normalize():f} credits added" + (f" ({note})" if note else "")
        invoice = _bill(contract, kind=InvoiceLine.Kind.CONTRACT, description=label, credits=credits,
                        unit_price=price, actor=actor, actor_label=actor_label)
        amendment.grant = _contract_grant(
            contract, credits=credits, unit_price=price, key=f"contract:{contract.pk}:amendment:{amendment.pk}",
            reason=label, effective_at=effective_at, expires_at=_contract_year_end(contract, effective_at),
            actor=actor, actor_label=actor_label)
        amendment.invoice = invoice_issue(invoice_id=invoice.pk, now=now, actor=actor, actor_label=actor_label)
        amendment.save(update_fields=["grant", "invoice"])
        audit_record(actor=actor, actor_label=actor_label, action="contract.add_credits", obj=contract,
                     changes={"credits": credits, "unit_price": price, "invoice": amendment.invoice.number,
                              "grant": amendment.grant.pk, "note": note})
        events.publish("contract.amended", {"contract": contract.pk, "amendment": amendment.pk,
                                            "kind": amendment.kind})
    return amendment


def contract_change_price(
    *, contract_id: int, effective_at: datetime, list_price: Decimal | None = None,
    true_up_price: Decimal | None = None, note: str = "", idempotency_key: str | None = None,
    now: datetime | None = None, actor=None, actor_label: str = "",
) -> ContractAmendment:
    """Amend an active contract's list price per credit (before the discount)
    and/or its true-up price from ``effective_at``: instalments due from then
    and true-ups dated from then use it; what was billed stays billed (Conflict
    if an instalment due from then was already released). Recorded as a
    ``price_change`` amendment; idempotent per ``idempotency_key``."""
    now = now or timezone.now()
    if list_price is None and true_up_price is None:
        raise InvalidRequest("Give a new list price or true-up price.", details={"list_price": "required"})
    for field, value in (("list_price", list_price), ("true_up_price", true_up_price)):
        if value is not None and not ZERO <= Decimal(value) <= MAX_RATE:
            raise InvalidRequest("Prices are not negative.", details={field: "must be >= 0"})
    with transaction.atomic():
        contract, existing = _lock_for_amendment(
            contract_id, idempotency_key, ContractAmendment.Kind.PRICE_CHANGE, now, effective_at=effective_at,
            outside_term="The new price takes effect within the term.")
        if existing is not None:
            return existing
        if list_price is not None and contract.instalments.filter(released_at__isnull=False,
                                                                  due_at__gte=effective_at).exists():
            raise Conflict("An instalment due from that date was already billed; change the price from a later "
                           "date or credit the invoice.", details={"effective_at": effective_at.isoformat()})
        amendment = ContractAmendment.objects.create(
            contract=contract, kind=ContractAmendment.Kind.PRICE_CHANGE, effective_at=effective_at,
            list_price=None if list_price is None else round_rate(list_price),
            true_up_price=None if true_up_price is None else round_rate(true_up_price),
            note=note[:500], idempotency_key=idempotency_key, created_by=_user(actor))
        audit_record(actor=actor, actor_label=actor_label, action="contract.change_price", obj=contract,
                     changes={"effective_at": effective_at.isoformat(), "list_price": list_price,
                              "true_up_price": true_up_price, "note": note})
        events.publish("contract.amended", {"contract": contract.pk, "amendment": amendment.pk,
                                            "kind": amendment.kind})
    return amendment


def _user(actor):
    return actor if actor is not None and getattr(actor, "is_authenticated", False) else None


# --- Reading: the true-up statement ---------------------------------------------


@dataclass(frozen=True)
class ContractStatement:
    """Where a contract stands against its commitment, as of ``as_of``."""

    contract: Contract
    as_of: datetime
    period_start: datetime
    period_end: datetime
    committed: Decimal
    consumed: Decimal
    burn_rate_per_day: Decimal
    projected_consumption: Decimal
    outstanding_overage: Decimal
    credits_available: Decimal
    credits_to_release: Decimal
    projected_overage: Decimal
    true_up_price: Decimal
    projected_true_up_amount: Decimal
    term_end: datetime
    term_committed: Decimal
    term_consumed: Decimal
    projected_term_consumption: Decimal
    effective_price: Decimal


def _project(consumed: Decimal, start: datetime, end: datetime, at: datetime) -> tuple[Decimal, Decimal]:
    """(burn rate per day, projected consumption at ``end``) from the consumption since ``start``."""
    elapsed = Decimal(str(max((min(at, end) - start).total_seconds(), 0))) / DAY_SECONDS
    left = Decimal(str(max((end - max(at, start)).total_seconds(), 0))) / DAY_SECONDS
    burn = consumed / elapsed if elapsed > 0 else ZERO
    return round_credits(burn), round_credits(consumed + burn * left)


def contract_statement(*, contract: Contract, now: datetime | None = None) -> ContractStatement:
    """The true-up statement of an active or ended contract (read-only): the
    current true-up period (the first unsettled one, else the last), its
    committed and consumed credits, the burn rate so far, projected consumption
    at the true-up date and at term end, and the projected true-up: consumption
    still to come beyond the usable credits and the instalments due before the
    date (less overage already outstanding), × the true-up price.
    InvalidRequest for a draft (no schedule yet)."""
    now = now or timezone.now()
    if contract.status in (Contract.Status.DRAFT, Contract.Status.CANCELED):
        raise InvalidRequest(f"{contract} is {contract.status}: it has no statement.",
                             details={"status": contract.status})
    period = (contract.true_ups.filter(settled_at__isnull=True).order_by("period_end").first()
              or contract.true_ups.order_by("-period_end").first())
    start, end = period.period_start, period.period_end
    consumed = _consumed(contract, start, min(now, end))
    burn, projected = _project(consumed, start, end, now)
    wallet = Wallet.objects.get(pk=contract.wallet_id)
    available = (CreditGrant.objects.filter(wallet_id=contract.wallet_id).usable(at=now)
                 .aggregate(t=Sum("remaining"))["t"] or ZERO)
    to_release = (contract.instalments.filter(released_at__isnull=True, due_at__lt=end)
                  .aggregate(t=Sum("credits"))["t"] or ZERO)
    if period.settled_at is not None:
        projected_overage = period.overage_credits
    else:
        still_to_come = projected - consumed
        projected_overage = max(still_to_come - (available + to_release - wallet.overage), ZERO)
    price = contract_true_up_price(contract, at=end)
    committed = round_credits(contract.committed_credits * _months_between(contract, start, end) / 12
                              + _added_credits(contract, start, end))
    term_consumed = _consumed(contract, contract.starts_at, min(now, contract.ends_at))
    _, term_projected = _project(term_consumed, contract.starts_at, contract.ends_at, now)
    term_committed = round_credits(contract.committed_credits * _term_months(contract) / 12
                                   + _added_credits(contract, contract.starts_at, contract.ends_at))
    return ContractStatement(
        contract=contract, as_of=now, period_start=start, period_end=end, committed=committed, consumed=consumed,
        burn_rate_per_day=burn, projected_consumption=projected, outstanding_overage=wallet.overage,
        credits_available=available, credits_to_release=to_release, projected_overage=round_credits(projected_overage),
        true_up_price=price, projected_true_up_amount=round_money(projected_overage * price, contract.currency),
        term_end=contract.ends_at, term_committed=term_committed, term_consumed=term_consumed,
        projected_term_consumption=term_projected, effective_price=contract_price(contract, at=min(now, end)),
    )


def contract_statement_at_hand(contract: Contract) -> ContractStatement | None:
    """The statement, or None for a contract that has none (drafts)."""
    try:
        return contract_statement(contract=contract)
    except InvalidRequest:
        return None

