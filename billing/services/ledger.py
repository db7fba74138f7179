"""Writing the ledger: the only code that appends entries and moves a wallet's
balance. Callers hold the wallet's row lock (``locks.lock_wallet``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal

from django.db import connection
from django.db.models import F, Sum
from django.utils import timezone

from billing import events
from billing.models import CreditGrant, LedgerEntry, Reservation, Wallet
from billing.numbers import ZERO


@dataclass
class Movement:
    type: str
    amount: Decimal
    grant: CreditGrant | None = None
    usage_event_id: int | None = None
    reservation_id: int | None = None
    reference: str = ""
    idempotency_key: str = ""
    memo: str = ""


def append_entries(*, wallet: Wallet, movements: list[Movement], overage_delta: Decimal = ZERO) -> list[LedgerEntry]:
    """Append ``movements`` to a locked wallet's ledger with consecutive sequence
    numbers and running balances, and store the new balance on the wallet."""
    now = timezone.now()
    balance = wallet.ledger_balance
    sequence = wallet.last_sequence
    entries = []
    for movement in movements:
        sequence += 1
        balance += movement.amount
        entries.append(
            LedgerEntry(
                wallet_id=wallet.pk,
                grant=movement.grant,
                type=movement.type,
                amount=movement.amount,
                sequence=sequence,
                balance_after=balance,
                usage_event_id=movement.usage_event_id,
                reservation_id=movement.reservation_id,
                reference=movement.reference,
                idempotency_key=movement.idempotency_key,
                memo=movement.memo,
                created_at=now,
            )
        )
    if not entries and not overage_delta:
        return []
    LedgerEntry.objects.bulk_create(entries)
    Wallet.objects.filter(pk=wallet.pk).update(
        ledger_balance=balance, last_sequence=sequence, overage=F("overage") + overage_delta
    )
    wallet.ledger_balance = balance
    wallet.last_sequence = sequence
    wallet.overage += overage_delta
    return entries


def append_entries_many(appends: list[tuple[Wallet, list[Movement], Decimal]]) -> None:
    """``append_entries`` for several locked wallets at once: the same entries,
    sequences, running balances and wallet updates, in one INSERT (wallet by
    wallet, in the given order) and one UPDATE, whatever the number of wallets."""
    now = timezone.now()
    entries = []
    wallets = []
    for wallet, movements, overage_delta in appends:
        if not movements and not overage_delta:
            continue
        balance = wallet.ledger_balance
        sequence = wallet.last_sequence
        for movement in movements:
            sequence += 1
            balance += movement.amount
            entries.append({
                "n": len(entries), "wallet_id": wallet.pk, "grant_id": movement.grant.pk if movement.grant else None,
                "type": movement.type, "amount": str(movement.amount), "sequence": sequence,
                "balance_after": str(balance), "usage_event_id": movement.usage_event_id,
                "reservation_id": movement.reservation_id, "reference": movement.reference,
                "idempotency_key": movement.idempotency_key, "memo": movement.memo,
            })
        wallet.ledger_balance = balance
        wallet.last_sequence = sequence
        wallet.overage += overage_delta
        wallets.append({"id": wallet.pk, "ledger_balance": str(balance), "last_sequence": sequence,
                        "overage_delta": str(overage_delta)})
    if not wallets:
        return
    with connection.cursor() as cursor:
        if entries:
            cursor.execute(
                f"""INSERT INTO {LedgerEntry._meta.db_table} (wallet_id, grant_id, type, amount, sequence, balance_after,
                        usage_event_id, reservation_id, reference, idempotency_key, memo, created_at)
                    SELECT wallet_id, grant_id, type, amount, sequence, balance_after, usage_event_id, reservation_id,
                           reference, idempotency_key, memo, %s
                      FROM json_to_recordset(%s::json) AS v(n int, wallet_id bigint, grant_id bigint,
                           type text, amount numeric, sequence bigint, balance_after numeric, usage_event_id bigint,
                           reservation_id bigint, reference text, idempotency_key text, memo text)
                     ORDER BY n""",
                [now, json.dumps(entries)],
            )
        cursor.execute(
            f"""UPDATE {Wallet._meta.db_table} w SET ledger_balance = v.ledger_balance,
                       last_sequence = v.last_sequence, overage = w.overage + v.overage_delta
                  FROM json_to_recordset(%s::json) AS v(id bigint, ledger_balance numeric, last_sequence bigint,
                       overage_delta numeric)
                 WHERE w.id = v.id""",
            [json.dumps(wallets)],
        )


def open_holds_total(wallet: Wallet, *, at, exclude_reservation_id: int | None = None) -> Decimal:
    holds = Reservation.objects.filter(wallet=wallet, status=Reservation.Status.OPEN, expires_at__gt=at)
    if exclude_reservation_id is not None:
        holds = holds.exclude(pk=exclude_reservation_id)
    return holds.aggregate(total=Sum("amount"))["total"] or ZERO


def available_now(wallet: Wallet, *, at=None) -> Decimal:
    """Available balance of a (locked) wallet for unscoped usage: usable remaining − holds + headroom."""
    at = at or timezone.now()
    usable = CreditGrant.objects.filter(wallet=wallet).usable(at=at).aggregate(t=Sum("remaining"))["t"] or ZERO
    return usable - open_holds_total(wallet, at=at) + headroom(wallet)


def watch_balance(wallet: Wallet, *, delta: Decimal, cause: str, at=None) -> None:
    """After a movement of ``delta`` available credits on a locked wallet, call the
    balance-crossing hook if a mark was crossed. Costs a query only when marks are set."""
    if wallet.alert_below is None and wallet.alert_at_or_above is None:
        return
    after = available_now(wallet, at=at)
    before = after - delta
    if wallet.crosses_alert_mark(before, after):
        events.balance_crossed(wallet=wallet, before=before, after=after, cause=cause)


def headroom(wallet: Wallet) -> Decimal:
    """Credits an overdraft wallet may still borrow."""
    if wallet.policy != Wallet.Policy.OVERDRAFT:
        return ZERO
    return max(wallet.credit_limit - wallet.overage, ZERO)


def allocate(*, grants: list[CreditGrant], amount: Decimal) -> tuple[list[tuple[CreditGrant, Decimal]], Decimal]:
    """Split ``amount`` over ``grants`` (already in consumption order).
    Returns the allocations and the part no grant covered."""
    allocations = []
    left = amount
    for grant in grants:
        if left <= 0:
            break
        take = min(grant.remaining, left)
        if take > 0:
            allocations.append((grant, take))
            left -= take
    return allocations, left


def debit_grants(
    *, allocations: list[tuple[CreditGrant, Decimal]], entry_type: str, **movement_fields
) -> list[Movement]:
    """Take the allocated credits out of each (locked) grant; return the movements to append."""
    movements = []
    for grant, take in allocations:
        grant.remaining -= take
        fields = ["remaining"]
        if grant.remaining == 0 and grant.status == CreditGrant.Status.ACTIVE:
            grant.status = CreditGrant.Status.DEPLETED
            fields.append("status")
        CreditGrant.objects.filter(pk=grant.pk).update(**{f: getattr(grant, f) for f in fields})
        movements.append(Movement(type=entry_type, amount=-take, grant=grant, **movement_fields))
    return movements


def settle_overage(*, wallet: Wallet, grant: CreditGrant, reference: str = "") -> tuple[list[Movement], Decimal]:
    """A new active grant first repays the wallet's outstanding overage.

    Two legs with the same type: credits leave the grant and cancel the
    overage (an entry without grant), so the ledger balance does not move.
    Returns the movements and the (negative) change in overage."""
    if wallet.overage <= 0 or grant.remaining <= 0:
        return [], ZERO
    repay = min(wallet.overage, grant.remaining)
    grant.remaining -= repay
    if grant.remaining == 0:
        grant.status = CreditGrant.Status.DEPLETED
    CreditGrant.objects.filter(pk=grant.pk).update(remaining=grant.remaining, status=grant.status)
    memo = f"Grant #{grant.pk} repays outstanding overage"
    movements = [
        Movement(type=LedgerEntry.Type.OVERAGE_SETTLED, amount=-repay, grant=grant, reference=reference, memo=memo),
        Movement(type=LedgerEntry.Type.OVERAGE_SETTLED, amount=repay, grant=None, reference=reference, memo=memo),
    ]
    return movements, -repay
