"""Row locks, one helper per model.

Lock order, everywhere: grants (primary-key order) first, then the wallet,
then the teams' monthly spend counters (``team_limits.lock_team_spends``,
primary-key order), then reservations. The wallet lock is the serialisation
point for a wallet's balance: every write of a wallet's grants, entries or
holds happens while it is held, so whoever holds it sees a consistent wallet.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import connection

from billing.models import CreditGrant, Reservation, Wallet


def lock_grants(grant_ids: Iterable[int]) -> dict[int, CreditGrant]:
    ids = sorted(set(grant_ids))
    if not ids:
        return {}
    rows = CreditGrant.objects.select_for_update(of=("self",)).filter(pk__in=ids).order_by("pk")
    return {grant.pk: grant for grant in rows}


def lock_wallet(wallet_id: int) -> Wallet:
    return Wallet.objects.select_for_update(of=("self",)).get(pk=wallet_id)


def lock_reservation(reservation_id: int) -> Reservation:
    return Reservation.objects.select_for_update(of=("self",)).get(pk=reservation_id)


def lock_key(namespace: str, key: str) -> None:
    """Serialise work on one idempotency key for the rest of the transaction."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))", [namespace, key])
