"""Notifications: who hears about an event, on which channel, how often, and
delivering each notice with retries, an attempt log and webhook endpoint health.

Settings (getattr with defaults): ALERTS_MAX_ATTEMPTS (8), ALERTS_RETRY_BASE_SECONDS
(30), ALERTS_RETRY_MAX_SECONDS (21600), ALERTS_WEBHOOK_DISABLE_AFTER (10
consecutive failed attempts), ALERTS_TOP_UP_URL, ALERTS_SMS_BACKEND and the
TWILIO_* variables (see ``alerts.channels``).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from alerts import channels
from alerts.models import (
    SEVERITY_RANK,
    AlertLevel,
    AlertRule,
    AlertsProfile,
    EventType,
    Notification,
    NotificationAttempt,
    Severity,
    WebhookEndpoint,
)
from billing.errors import Conflict, NotFound
from billing.models import Customer, Wallet
from billing.roles import FINANCE

logger = logging.getLogger(__name__)

INTERNAL_EVENTS = {EventType.TOP_UP_RUNAWAY, EventType.TOP_UP_DISABLED, EventType.TOP_UP_AWAITING_APPROVAL,
                   EventType.ENDPOINT_DISABLED}
# Rule-driven notices: at most one per rule, channel and event type per rule.min_interval.
RATE_LIMITED = {EventType.BALANCE_LOW, EventType.DEPLETED, EventType.BALANCE_RECOVERED}
CUSTOMER_AUDIENCES = {"billing", "technical"}

SUBJECTS = {
    EventType.BALANCE_LOW: "{customer_name}: credits running low ({available} left)",
    EventType.DEPLETED: "{customer_name}: credits used up",
    EventType.BALANCE_RECOVERED: "{customer_name}: credit balance back above {threshold}",
    EventType.PAUSED: "{customer_name}: wallet paused until credits arrive",
    EventType.RESUMED: "{customer_name}: wallet active again",
    EventType.TOPPED_UP: "{customer_name}: {amount} credits added",
    EventType.GRANT_EXPIRING_SOON: "{customer_name}: {remaining} credits expire on {expires_on}",
    EventType.GRANT_EXPIRED: "{customer_name}: {credits} credits expired",
    EventType.TOP_UP_RUNAWAY: "Auto top-up cap reached for {customer_name}",
    EventType.TOP_UP_DISABLED: "Auto top-up disabled for {customer_name}",
    EventType.TOP_UP_AWAITING_APPROVAL: "Auto top-up of {credits} credits for {customer_name} awaits approval",
    EventType.ENDPOINT_DISABLED: "Webhook endpoint disabled: {url}",
}
TEMPLATES = {
    EventType.GRANT_EXPIRING_SOON: "grant_notice",
    EventType.GRANT_EXPIRED: "grant_notice",
    **{event: "staff_notice" for event in INTERNAL_EVENTS},
}


@dataclass(frozen=True)
class Recipient:
    channel: str
    address: str
    audience: str
    endpoint: WebhookEndpoint | None = None


def _setting(name: str, default):
    return getattr(settings, name, default)


def finance_emails() -> list[str]:
    users = get_user_model().objects.filter(groups__name=FINANCE, is_active=True).exclude(email="")
    return sorted(set(users.values_list("email", flat=True)))


def recipients_for(*, customer: Customer | None, rule: AlertRule | None, event_type: str) -> list[Recipient]:
    """Customer contacts (billing, technical), staff (account owner, finance) and
    the webhook endpoints subscribed to ``event_type``, as the rule asks.
    With no rule: email to the billing contact and the account owner, webhooks on."""
    profile = AlertsProfile.objects.filter(customer=customer).select_related("account_owner").first() if customer else None
    owner = profile.account_owner if profile and profile.account_owner and profile.account_owner.email else None
    out: list[Recipient] = []
    if event_type in INTERNAL_EVENTS:
        out += [Recipient(Notification.Channel.EMAIL, email, "finance") for email in finance_emails()]
        if owner:
            out.append(Recipient(Notification.Channel.EMAIL, owner.email, "account_owner"))
        return _unique(out)
    wants = {
        "email": rule.email if rule else True,
        "sms": rule.sms if rule else False,
        "webhook": rule.webhook if rule else True,
        "billing": rule.notify_billing_contact if rule else True,
        "technical": rule.notify_technical_contact if rule else False,
        "account_owner": rule.notify_account_owner if rule else True,
        "finance": rule.notify_finance if rule else False,
    }
    billing_email = (profile.billing_email if profile else "") or (customer.email if customer else "")
    if wants["email"]:
        if wants["billing"] and billing_email:
            out.append(Recipient(Notification.Channel.EMAIL, billing_email, "billing"))
        if wants["technical"] and profile and profile.technical_email:
            out.append(Recipient(Notification.Channel.EMAIL, profile.technical_email, "technical"))
        if wants["account_owner"] and owner:
            out.append(Recipient(Notification.Channel.EMAIL, owner.email, "account_owner"))
        if wants["finance"]:
            out += [Recipient(Notification.Channel.EMAIL, email, "finance") for email in finance_emails()]
    if wants["sms"] and profile:
        if wants["billing"] and profile.billing_phone:
            out.append(Recipient(Notification.Channel.SMS, profile.billing_phone, "billing"))
        if wants["technical"] and profile.technical_phone:
            out.append(Recipient(Notification.Channel.SMS, profile.technical_phone, "technical"))
    if wants["webhook"]:
        endpoints = WebhookEndpoint.objects.filter(enabled=True, event_types__contains=[event_type])
        if customer is not None:
            endpoints = endpoints.filter(customer__isnull=True) | endpoints.filter(customer=customer)
        else:
            endpoints = endpoints.filter(customer__isnull=True)
        out += [Recipient(Notification.Channel.WEBHOOK, e.url, "webhook", e) for e in endpoints.order_by("pk")]
    return _unique(out)


def _unique(recipients: list[Recipient]) -> list[Recipient]:
    seen, out = set(), []
    for r in recipients:
        key = (r.channel, r.address, r.endpoint.pk if r.endpoint else None)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def quiet_hours_end(profile: AlertsProfile | None, customer: Customer, now: datetime) -> datetime | None:
    """When quiet hours are on for the customer right now, the moment they end (UTC)."""
    if profile is None or profile.quiet_hours_start is None or profile.quiet_hours_end is None:
        return None
    start, end = profile.quiet_hours_start, profile.quiet_hours_end
    local = now.astimezone(zoneinfo.ZoneInfo(customer.timezone))
    t = local.time()
    inside = start <= t < end if start < end else (t >= start or t < end)
    if not inside:
        return None
    until = local.replace(hour=end.hour, minute=end.minute, second=0, microsecond=0)
    if until <= local:
        until += timedelta(days=1)
    return until.astimezone(UTC)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def subject_for(event_type: str, payload: dict) -> str:
    template = SUBJECTS.get(event_type, "{event_type}")

    class Missing(dict):
        def __missing__(self, key):
            return "?"

    return template.format_map(Missing(payload, event_type=event_type))[:255]


def notify(
    *, event_type: str, payload: dict, dedupe: str, now: datetime, customer: Customer | None = None,
    wallet: Wallet | None = None, rule: AlertRule | None = None, level: AlertLevel | None = None,
    severity: str = Severity.INFO,
) -> list[Notification]:
    """Record one notification per recipient and channel and queue each for
    delivery once the current transaction commits.

    Guarantees: idempotent on ``dedupe`` (a second call for the same breach,
    grant or event creates nothing new); for rule-driven notices at most one per
    rule, channel and event type within ``rule.min_interval`` — a later one of no
    higher severity is recorded as ``suppressed`` and not sent; SMS to customer
    contacts wait for the end of their quiet hours. Returns the new pending ones.
    """
    recipients = recipients_for(customer=customer, rule=rule, event_type=event_type)
    if not recipients:
        return []
    limited: set[str] = set()
    if rule is not None and wallet is not None and event_type in RATE_LIMITED:
        rank = SEVERITY_RANK[severity]
        for channel in {r.channel for r in recipients}:
            recent = Notification.objects.filter(
                wallet=wallet, rule=rule, channel=channel, event_type=event_type,
                status__in=(Notification.Status.PENDING, Notification.Status.SENT),
                created_at__gt=now - rule.min_interval,
            ).values_list("severity", flat=True)
            if any(SEVERITY_RANK[s] >= rank for s in recent):
                limited.add(channel)
    profile = AlertsProfile.objects.filter(customer=customer).first() if customer else None
    quiet_until = quiet_hours_end(profile, customer, now) if customer else None
    subject = subject_for(event_type, payload)
    fresh = []
    for r in recipients:
        key = f"{dedupe}:{r.channel}:{r.audience}:{_digest(r.address)}"
        not_before = quiet_until if r.channel == Notification.Channel.SMS and r.audience in CUSTOMER_AUDIENCES else None
        notification, created = Notification.objects.get_or_create(dedupe_key=key[:255], defaults=dict(
            event_type=event_type, channel=r.channel, severity=severity, customer=customer, wallet=wallet,
            rule=rule, level=level, endpoint=r.endpoint, recipient=r.address, audience=r.audience,
            subject=subject, payload=payload, not_before=not_before, created_at=now,
            message_id=f"msg_{uuid.uuid4().hex}" if r.channel == Notification.Channel.WEBHOOK else "",
            status=Notification.Status.SUPPRESSED if r.channel in limited else Notification.Status.PENDING,
        ))
        if created and notification.status == Notification.Status.PENDING:
            fresh.append(notification)
    for notification in fresh:
        if notification.not_before is None:
            queue_delivery(notification.pk)
    return fresh


def queue_delivery(notification_id: int) -> None:
    """Hand the notification to a Celery worker after the current transaction commits."""
    from alerts.tasks import deliver_notification

    transaction.on_commit(lambda: deliver_notification.delay(notification_id))


# --- Delivery -----------------------------------------------------------------

@dataclass
class DeliveryOutcome:
    outcome: str  # sent | retry | failed | cancelled | deferred | skipped
    attempts: int = 0
    retry_in: int | None = None


def backoff_seconds(attempts: int) -> int:
    """Exponential backoff after the ``attempts``-th failed attempt: base × 2^(attempts − 1), capped."""
    base = int(_setting("ALERTS_RETRY_BASE_SECONDS", 30))
    return min(base * 2 ** (attempts - 1), int(_setting("ALERTS_RETRY_MAX_SECONDS", 6 * 3600)))


def _send(notification: Notification, now: datetime) -> channels.SendResult:
    payload = notification.payload
    if notification.channel == Notification.Channel.WEBHOOK:
        endpoint = notification.endpoint
        body = channels.webhook_body(event_type=notification.event_type, timestamp=notification.created_at,
                                     data=payload)
        return channels.send_webhook(url=endpoint.url, msg_id=notification.message_id, body=body,
                                     secrets=endpoint.signing_secrets(now), timestamp=int(now.timestamp()))
    if notification.channel == Notification.Channel.SMS:
        text = f"Creditdesk: {notification.subject}"
        if payload.get("top_up_url"):
            text += f" Top up: {payload['top_up_url']}"
        return channels.sms_backend().send(to=notification.recipient, body=text[:320])
    context = dict(payload, event_type=notification.event_type, subject=notification.subject,
                   severity=notification.severity, audience=notification.audience,
                   internal=notification.event_type in INTERNAL_EVENTS)
    return channels.send_email(to=notification.recipient, subject=notification.subject,
                               template=TEMPLATES.get(notification.event_type, "balance_notice"), context=context)


def notification_deliver(*, notification_id: int, expected_attempts: int | None = None,
                         now: datetime | None = None) -> DeliveryOutcome:
    """Make one delivery attempt and log it (status code, latency, response excerpt).

    Guarantees: one attempt at a time per notification (row lock; a concurrent
    caller skips); a sent, failed or cancelled notification is never attempted
    again (replay resets it first); a retry that is not yet due is skipped unless
    it is the task's own retry (``expected_attempts`` matches). On failure the
    next try is scheduled with exponential backoff until ALERTS_MAX_ATTEMPTS.
    A webhook endpoint is disabled after ALERTS_WEBHOOK_DISABLE_AFTER consecutive
    failed attempts or at once on 410 Gone, and finance is told.
    """
    now = now or timezone.now()
    with transaction.atomic():
        notification = (Notification.objects.select_for_update(skip_locked=True, of=("self",))
                        .select_related("endpoint").filter(pk=notification_id).first())
        if notification is None:
            return DeliveryOutcome("skipped")
        if notification.status != Notification.Status.PENDING:
            return DeliveryOutcome("skipped", notification.attempts)
        if notification.not_before and notification.not_before > now:
            return DeliveryOutcome("deferred", notification.attempts)
        own_retry = expected_attempts is not None and expected_attempts == notification.attempts
        if notification.next_attempt_at and notification.next_attempt_at > now and not own_retry:
            return DeliveryOutcome("skipped", notification.attempts)
        endpoint = notification.endpoint
        if notification.channel == Notification.Channel.WEBHOOK and (endpoint is None or not endpoint.enabled):
            notification.status = Notification.Status.CANCELLED
            notification.last_error = "Endpoint disabled."
            notification.save(update_fields=["status", "last_error"])
            return DeliveryOutcome("cancelled", notification.attempts)

        result = _send(notification, now)
        notification.attempts += 1
        attempt = NotificationAttempt(
            notification=notification, attempted_at=now, ok=result.ok, status_code=result.status_code,
            latency_ms=result.latency_ms, response_excerpt=result.response_excerpt[:500], error=result.error[:500],
        )
        fields = ["attempts", "status", "next_attempt_at", "last_error", "sent_at", "message_id"]
        outcome = DeliveryOutcome("sent", notification.attempts)
        if result.ok:
            notification.status = Notification.Status.SENT
            notification.sent_at = now
            notification.next_attempt_at = None
            notification.last_error = ""
            if result.message_id and not notification.message_id:
                notification.message_id = result.message_id[:64]
            if endpoint is not None and endpoint.consecutive_failures:
                WebhookEndpoint.objects.filter(pk=endpoint.pk).update(consecutive_failures=0)
        else:
            notification.last_error = (result.error or f"HTTP {result.status_code}")[:500]
            endpoint_disabled = False
            if endpoint is not None:
                endpoint_disabled = _endpoint_failed(endpoint, result, now)
            if result.retryable and not endpoint_disabled and notification.attempts < int(
                    _setting("ALERTS_MAX_ATTEMPTS", 8)):
                delay = backoff_seconds(notification.attempts)
                notification.next_attempt_at = now + timedelta(seconds=delay)
                attempt.retry_in_seconds = delay
                outcome = DeliveryOutcome("retry", notification.attempts, delay)
            else:
                notification.status = Notification.Status.FAILED
                notification.next_attempt_at = None
                outcome = DeliveryOutcome("failed", notification.attempts)
        attempt.save()
        notification.save(update_fields=fields)
    return outcome


def _endpoint_failed(endpoint: WebhookEndpoint, result: channels.SendResult, now: datetime) -> bool:
    """Count a failed attempt against the endpoint; True when it is (now) disabled."""
    locked = WebhookEndpoint.objects.select_for_update().get(pk=endpoint.pk)
    locked.consecutive_failures += 1
    locked.save(update_fields=["consecutive_failures"])
    limit = int(_setting("ALERTS_WEBHOOK_DISABLE_AFTER", 10))
    if result.gone:
        webhook_endpoint_disable(endpoint_id=locked.pk, reason="The receiver answered 410 Gone.", now=now)
        return True
    if locked.consecutive_failures >= limit:
        webhook_endpoint_disable(endpoint_id=locked.pk, now=now,
                                 reason=f"{locked.consecutive_failures} consecutive failed deliveries.")
        return True
    return not locked.enabled


def webhook_endpoint_disable(*, endpoint_id: int, reason: str, now: datetime | None = None) -> WebhookEndpoint:
    """Stop sending to an endpoint: its pending deliveries are cancelled and
    finance gets an email. Idempotent (a disabled endpoint stays as it is)."""
    now = now or timezone.now()
    with transaction.atomic():
        endpoint = WebhookEndpoint.objects.select_for_update().get(pk=endpoint_id)
        if not endpoint.enabled:
            return endpoint
        endpoint.enabled = False
        endpoint.disabled_at = now
        endpoint.disabled_reason = reason[:255]
        endpoint.save(update_fields=["enabled", "disabled_at", "disabled_reason"])
        # Skip rows another worker is delivering right now: that attempt sees the
        # endpoint disabled next time; waiting for it could deadlock.
        idle = list(Notification.objects.select_for_update(skip_locked=True, of=("self",)).filter(
            endpoint=endpoint, status=Notification.Status.PENDING).values_list("pk", flat=True))
        Notification.objects.filter(pk__in=idle).update(status=Notification.Status.CANCELLED,
                                                         last_error="Endpoint disabled.")
        customer = endpoint.customer
        notify(event_type=EventType.ENDPOINT_DISABLED, customer=customer, severity=Severity.CRITICAL, now=now,
               dedupe=f"endpoint-disabled:{endpoint.pk}:{int(now.timestamp())}",
               payload={"url": endpoint.url, "reason": reason, "endpoint": endpoint.pk,
                        "customer_name": customer.name if customer else "all customers",
                        "disabled_at": now.isoformat()})
    return endpoint


def webhook_endpoint_enable(*, endpoint_id: int) -> WebhookEndpoint:
    """Turn a disabled endpoint back on with a clean failure count."""
    with transaction.atomic():
        endpoint = WebhookEndpoint.objects.select_for_update().get(pk=endpoint_id)
        endpoint.enabled = True
        endpoint.consecutive_failures = 0
        endpoint.disabled_at = None
        endpoint.disabled_reason = ""
        endpoint.save(update_fields=["enabled", "consecutive_failures", "disabled_at", "disabled_reason"])
    return endpoint


def webhook_endpoint_rotate_secret(*, endpoint_id: int, overlap: timedelta = timedelta(hours=24),
                                   now: datetime | None = None) -> WebhookEndpoint:
    """Give the endpoint a new secret; for ``overlap`` every message carries
    signatures by both the old and the new secret, so receivers switch without downtime."""
    from alerts.models import new_webhook_secret

    now = now or timezone.now()
    with transaction.atomic():
        endpoint = WebhookEndpoint.objects.select_for_update().get(pk=endpoint_id)
        endpoint.previous_secret = endpoint.secret
        endpoint.previous_secret_expires_at = now + overlap
        endpoint.secret = new_webhook_secret()
        endpoint.save(update_fields=["secret", "previous_secret", "previous_secret_expires_at"])
    return endpoint


def notification_replay(*, notification_id: int) -> Notification:
    """Send a notification again (same webhook-id, so receivers can deduplicate).
    Refused while its webhook endpoint is disabled."""
    with transaction.atomic():
        notification = Notification.objects.select_for_update(of=("self",)).select_related("endpoint").filter(
            pk=notification_id).first()
        if notification is None:
            raise NotFound("No such notification.")
        if notification.endpoint is not None and not notification.endpoint.enabled:
            raise Conflict(f"Endpoint {notification.endpoint.url} is disabled; enable it first.")
        notification.status = Notification.Status.PENDING
        notification.next_attempt_at = None
        notification.not_before = None
        notification.last_error = ""
        notification.save(update_fields=["status", "next_attempt_at", "not_before", "last_error"])
        queue_delivery(notification.pk)
    return notification


def notifications_due(*, now: datetime, stale_after: timedelta = timedelta(minutes=2)):
    """Pending notifications a worker should have sent by now: retries that are
    due, quiet-hour holds that ended, and fresh ones whose queued task was lost."""
    from django.db.models import Q

    return Notification.objects.filter(status=Notification.Status.PENDING).filter(
        Q(next_attempt_at__lte=now)
        | Q(next_attempt_at__isnull=True, not_before__lte=now)
        | Q(next_attempt_at__isnull=True, not_before__isnull=True, created_at__lte=now - stale_after)
    )
