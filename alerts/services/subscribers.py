"""Reactions to billing's outbox events (registered in ``AlertsConfig.ready``).

They run after billing's transaction committed. Each is idempotent (notices
are deduplicated on the event's grant or timestamp), because the outbox may
deliver an event again.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from alerts.models import AutoTopUpRun, EventType, Severity
from alerts.services.auto_top_up import auto_top_up_grant_settled, auto_top_up_payment_failed
from alerts.services.evaluation import rule_for_wallet, wallet_payload
from alerts.services.notifications import notify
from billing.errors import Conflict
from billing.models import CreditGrant, Wallet

TOPPED_UP_SOURCES = {CreditGrant.Source.PACK_PURCHASE, CreditGrant.Source.AUTO_TOP_UP}


def _wallet(payload: dict) -> Wallet | None:
    return Wallet.objects.select_related("customer").filter(pk=payload.get("wallet")).first()


def _queue_refresh(wallet_id: int) -> None:
    from alerts.tasks import wallet_refresh

    transaction.on_commit(lambda: wallet_refresh.delay(wallet_id))


def on_grant_activated(topic: str, payload: dict) -> None:
    """Credits arrived: settle a top-up waiting for them, tell the customer about
    purchased credits, and re-evaluate the wallet (percent thresholds move with grants)."""
    grant = CreditGrant.objects.select_related("wallet", "wallet__customer").filter(pk=payload.get("grant")).first()
    if grant is None:
        return
    now = timezone.now()
    if grant.source == CreditGrant.Source.AUTO_TOP_UP:
        auto_top_up_grant_settled(grant_id=grant.pk, now=now)
    with transaction.atomic():
        if grant.source in TOPPED_UP_SOURCES:
            wallet = grant.wallet
            data = wallet_payload(wallet, available=_available(wallet, now), now=now)
            data.update({"grant": grant.pk, "amount": str(grant.original_amount), "source": grant.source,
                         "kind": grant.kind})
            notify(event_type=EventType.TOPPED_UP, customer=wallet.customer, wallet=wallet,
                   rule=rule_for_wallet(wallet), now=now, payload=data, dedupe=f"wallet.topped_up:{grant.pk}")
        _queue_refresh(grant.wallet_id)


def _available(wallet: Wallet, now):
    from alerts.selectors import wallet_available

    return wallet_available(wallet, at=now)


def on_grant_expired(topic: str, payload: dict) -> None:
    wallet = _wallet(payload)
    if wallet is None or payload.get("credits") in (None, "0", "0.000000"):
        return
    now = timezone.now()
    with transaction.atomic():
        data = wallet_payload(wallet, available=_available(wallet, now), now=now)
        data.update({"grant": payload.get("grant"), "credits": payload.get("credits"), "kind": payload.get("kind")})
        notify(event_type=EventType.GRANT_EXPIRED, customer=wallet.customer, wallet=wallet,
               rule=rule_for_wallet(wallet), severity=Severity.WARNING, now=now, payload=data,
               dedupe=f"grant.expired:{payload.get('grant')}")


def on_wallet_paused(topic: str, payload: dict) -> None:
    wallet = _wallet(payload)
    if wallet is None:
        return
    now = timezone.now()
    with transaction.atomic():
        data = wallet_payload(wallet, available=_available(wallet, now), now=now)
        data["reason"] = payload.get("reason", "")
        notify(event_type=EventType.PAUSED, customer=wallet.customer, wallet=wallet, rule=rule_for_wallet(wallet),
               severity=Severity.CRITICAL, now=now, payload=data,
               dedupe=f"wallet.paused:{wallet.pk}:{payload.get('at') or payload.get('reason', '')}")


def on_wallet_resumed(topic: str, payload: dict) -> None:
    wallet = _wallet(payload)
    if wallet is None:
        return
    now = timezone.now()
    with transaction.atomic():
        data = wallet_payload(wallet, available=_available(wallet, now), now=now)
        data["grant"] = payload.get("grant")
        notify(event_type=EventType.RESUMED, customer=wallet.customer, wallet=wallet, rule=rule_for_wallet(wallet),
               now=now, payload=data,
               dedupe=f"wallet.resumed:{wallet.pk}:{payload.get('grant') or payload.get('at', '')}")
        _queue_refresh(wallet.pk)


def on_invoice_payment_failed(topic: str, payload: dict) -> None:
    """The payment of an invoice failed: each auto top-up waiting for it fails
    (its grant is voided; enough failures in a row switch the auto top-up off).
    A run no longer awaiting payment is left alone, so a redelivery changes nothing."""
    runs = AutoTopUpRun.objects.filter(grant_id__in=payload.get("grants") or [],
                                       status=AutoTopUpRun.Status.AWAITING_PAYMENT).values_list("pk", flat=True)
    for run_id in list(runs):
        try:
            auto_top_up_payment_failed(run_id=run_id, reason=payload.get("reason") or "Payment failed.")
        except Conflict:
            continue  # settled or failed meanwhile by another delivery
