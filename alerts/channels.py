"""How a notice leaves the building: email, SMS (provider interface with a
Twilio and a console implementation) and Standard Webhooks.

Each sender returns a ``SendResult``; none of them touches the database.
Settings (read with defaults, see the alerts section of the README):
ALERTS_SMS_BACKEND (``console`` | ``twilio``), TWILIO_ACCOUNT_SID,
TWILIO_AUTH_TOKEN, TWILIO_FROM_NUMBER, TWILIO_API_BASE_URL,
ALERTS_WEBHOOK_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.template.loader import render_to_string

logger = logging.getLogger(__name__)

TWILIO_DEFAULT_BASE = "https://api.twilio.com"
EXCERPT = 500


@dataclass
class SendResult:
    ok: bool
    status_code: int | None = None
    latency_ms: int = 0
    response_excerpt: str = ""
    error: str = ""
    retryable: bool = True
    gone: bool = False  # the receiver said 410 Gone: stop sending to it
    message_id: str = ""


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


# --- Email --------------------------------------------------------------------

def send_email(*, to: str, subject: str, template: str, context: dict) -> SendResult:
    """Render ``templates/alerts/<template>.txt`` and ``.html`` and send them
    through Django's configured email backend."""
    started = time.monotonic()
    try:
        text = render_to_string(f"alerts/{template}.txt", context)
        html = render_to_string(f"alerts/{template}.html", context)
        message = EmailMultiAlternatives(subject=subject, body=text, from_email=settings.DEFAULT_FROM_EMAIL,
                                         to=[to])
        message.attach_alternative(html, "text/html")
        message.send(fail_silently=False)
    except Exception as exc:  # any backend error (SMTP, file system) is one failed attempt
        return SendResult(ok=False, latency_ms=_elapsed_ms(started), error=f"{type(exc).__name__}: {exc}"[:EXCERPT])
    return SendResult(ok=True, latency_ms=_elapsed_ms(started))


# --- SMS ----------------------------------------------------------------------

class SmsBackend:
    """Send one text message. Implementations return a ``SendResult``."""

    def send(self, *, to: str, body: str) -> SendResult:  # pragma: no cover - interface
        raise NotImplementedError


class ConsoleSmsBackend(SmsBackend):
    """Development: prints the message to standard output."""

    def send(self, *, to: str, body: str) -> SendResult:
        sys.stdout.write(f"[sms to {to}] {body}\n")
        sys.stdout.flush()
        return SendResult(ok=True, message_id="console")


class TwilioSmsBackend(SmsBackend):
    """Twilio's Messages API through the official ``twilio`` client. ``base_url``
    replaces https://api.twilio.com (tests point it at a local stand-in)."""

    def __init__(self, *, account_sid: str, auth_token: str, from_number: str, base_url: str = ""):
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.from_number = from_number
        self.base_url = (base_url or TWILIO_DEFAULT_BASE).rstrip("/")

    def _client(self):
        from twilio.http.http_client import TwilioHttpClient
        from twilio.rest import Client

        base_url = self.base_url

        class RebasedHttpClient(TwilioHttpClient):
            def request(self, method, url, *args, **kwargs):
                if base_url != TWILIO_DEFAULT_BASE and url.startswith(TWILIO_DEFAULT_BASE):
                    url = base_url + url[len(TWILIO_DEFAULT_BASE):]
                return super().request(method, url, *args, **kwargs)

        return Client(self.account_sid, self.auth_token, http_client=RebasedHttpClient(timeout=10))

    def send(self, *, to: str, body: str) -> SendResult:
        from twilio.base.exceptions import TwilioException, TwilioRestException

        if not (self.account_sid and self.auth_token and self.from_number):
            return SendResult(ok=False, retryable=False, error="Twilio is not configured (TWILIO_* settings).")
        started = time.monotonic()
        try:
            message = self._client().messages.create(to=to, from_=self.from_number, body=body)
        except TwilioRestException as exc:
            status = exc.status
            return SendResult(ok=False, status_code=status, latency_ms=_elapsed_ms(started),
                              response_excerpt=str(exc.msg)[:EXCERPT], error=f"Twilio error {exc.code}"[:EXCERPT],
                              retryable=status >= 500 or status == 429)
        except (TwilioException, OSError) as exc:
            return SendResult(ok=False, latency_ms=_elapsed_ms(started), error=f"{type(exc).__name__}: {exc}"[:EXCERPT])
        return SendResult(ok=True, status_code=201, latency_ms=_elapsed_ms(started), message_id=message.sid or "",
                          response_excerpt=f"status={message.status}")


def sms_backend() -> SmsBackend:
    name = getattr(settings, "ALERTS_SMS_BACKEND", "console")
    if name == "twilio":
        return TwilioSmsBackend(
            account_sid=getattr(settings, "TWILIO_ACCOUNT_SID", ""),
            auth_token=getattr(settings, "TWILIO_AUTH_TOKEN", ""),
            from_number=getattr(settings, "TWILIO_FROM_NUMBER", ""),
            base_url=getattr(settings, "TWILIO_API_BASE_URL", ""),
        )
    if name == "console":
        return ConsoleSmsBackend()
    raise ValueError(f"Unknown ALERTS_SMS_BACKEND {name!r}: use 'console' or 'twilio'.")


# --- Webhooks (Standard Webhooks) --------------------------------------------

def webhook_body(*, event_type: str, timestamp: datetime, data: dict) -> str:
    """The JSON body of a webhook message; the same bytes on every retry."""
    return json.dumps({"type": event_type, "timestamp": timestamp.isoformat(), "data": data},
                      sort_keys=True, separators=(",", ":"), default=str)


def _secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        secret = secret[len("whsec_"):]
    return base64.b64decode(secret + "==")


def webhook_signature(*, secrets: list[str], msg_id: str, timestamp: int, body: str) -> str:
    """``v1,<base64 HMAC-SHA256(secret, "id.timestamp.body")>`` per secret, space-separated
    (during a rotation the old and the new secret both sign)."""
    to_sign = f"{msg_id}.{timestamp}.{body}".encode()
    return " ".join(
        "v1," + base64.b64encode(hmac.new(_secret_bytes(s), to_sign, hashlib.sha256).digest()).decode()
        for s in secrets
    )


def send_webhook(*, url: str, msg_id: str, body: str, secrets: list[str], timestamp: int) -> SendResult:
    """POST one signed message. 2xx is success; 410 means the receiver is gone."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Creditdesk-Webhooks/1.0",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": webhook_signature(secrets=secrets, msg_id=msg_id, timestamp=timestamp, body=body),
    }
    request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    timeout = float(getattr(settings, "ALERTS_WEBHOOK_TIMEOUT_SECONDS", 10))
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - admin-configured URL
            excerpt = response.read(EXCERPT).decode("utf-8", "replace")
            return SendResult(ok=True, status_code=response.status, latency_ms=_elapsed_ms(started),
                              response_excerpt=excerpt, message_id=msg_id)
    except urllib.error.HTTPError as exc:
        excerpt = exc.read(EXCERPT).decode("utf-8", "replace") if exc.fp else ""
        return SendResult(ok=False, status_code=exc.code, latency_ms=_elapsed_ms(started), response_excerpt=excerpt,
                          error=f"HTTP {exc.code}", gone=exc.code == 410, retryable=exc.code != 410)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return SendResult(ok=False, latency_ms=_elapsed_ms(started), error=f"{type(exc).__name__}: {exc}"[:EXCERPT])
