"""The one hook through which billing lets other apps react (DESIGN.md §1).

``publish(topic, payload)`` records an ``OutboxEvent`` row in the caller's
transaction and, once that transaction commits, hands the event to every
subscriber registered for the topic (``subscribe``). A subscriber that fails is
logged and does not undo the commit; the outbox row stays undispatched so the
``outbox_dispatch_pending`` job delivers it again. ``billing`` imports neither
``crm`` nor ``alerts``: they call ``subscribe`` from their ``AppConfig.ready``.

Topics published today: ``grant.activated``, ``grant.expired``, ``grant.voided``,
``wallet.resumed``. Usage charges publish nothing on their own.

Balance crossings are the one synchronous hook: a subscriber registered with
``on_balance_crossed`` runs *inside* the transaction that moved the balance,
with the wallet row locked, whenever available balance crosses the wallet's
``alert_below`` or ``alert_at_or_above`` mark. It may write its own state and
``publish`` follow-up events; it must not move credits.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

from django.db import transaction
from django.utils import timezone

logger = logging.getLogger(__name__)

Subscriber = Callable[[str, dict], None]
_subscribers: dict[str, list[Subscriber]] = defaultdict(list)


CrossingHandler = Callable[..., None]
_crossing_handlers: list[CrossingHandler] = []


def on_balance_crossed(handler: CrossingHandler) -> None:
    """Register ``handler(wallet=..., before=..., after=..., cause=...)`` (see module docstring)."""
    if handler not in _crossing_handlers:
        _crossing_handlers.append(handler)


def balance_crossed(*, wallet, before, after, cause: str) -> None:
    for handler in list(_crossing_handlers):
        handler(wallet=wallet, before=before, after=after, cause=cause)


def subscribe(topic: str, handler: Subscriber) -> None:
    if handler not in _subscribers[topic]:
        _subscribers[topic].append(handler)


def publish(topic: str, payload: dict) -> None:
    from billing.models import OutboxEvent

    event = OutboxEvent.objects.create(topic=topic, payload=payload)
    transaction.on_commit(lambda: dispatch(event.pk))


def dispatch(event_id: int) -> bool:
    """Deliver one outbox event to its subscribers; True when all succeeded."""
    from billing.models import OutboxEvent

    event = OutboxEvent.objects.filter(pk=event_id, dispatched_at__isnull=True).first()
    if event is None:
        return True
    ok = True
    for handler in list(_subscribers.get(event.topic, ())):
        try:
            handler(event.topic, event.payload)
        except Exception:
            ok = False
            logger.exception("outbox subscriber %r failed for %s #%s", handler, event.topic, event.pk)
    if ok:
        OutboxEvent.objects.filter(pk=event.pk, dispatched_at__isnull=True).update(dispatched_at=timezone.now())
    return ok
