"""A webhook receiver inside Creditdesk, for the demo: ``seed_alerts_demo``
points a webhook endpoint here, so the delivery log shows real, verified
deliveries without the internet.

``POST /alerts/demo-receiver/<endpoint id>`` checks the Standard Webhooks
signature against the endpoint's secrets (the previous one too while a rotation
overlaps) and a timestamp within five minutes: 204 when it verifies, 401 when
not. It stores nothing; it logs one line. Served only while
``ALERTS_DEMO_RECEIVER`` or ``DEBUG`` is on (404 otherwise).
"""

from __future__ import annotations

import hmac
import json
import logging
from datetime import timedelta

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import path
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from alerts.channels import webhook_signature
from alerts.models import WebhookEndpoint

logger = logging.getLogger(__name__)

TOLERANCE = timedelta(minutes=5)


def signature_valid(*, endpoint: WebhookEndpoint, msg_id: str, timestamp: str, signatures: str, body: str) -> bool:
    """True when one of the ``v1,<signature>`` entries of the header was made with
    one of the endpoint's current secrets over ``id.timestamp.body``."""
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    now = timezone.now()
    if abs(now.timestamp() - sent_at) > TOLERANCE.total_seconds():
        return False
    offered = [s for s in signatures.split() if s.startswith("v1,")]
    expected = [webhook_signature(secrets=[secret], msg_id=msg_id, timestamp=sent_at, body=body)
                for secret in endpoint.signing_secrets(now)]
    return any(hmac.compare_digest(o, e) for o in offered for e in expected)


@csrf_exempt
@require_POST
def demo_receiver(request: HttpRequest, endpoint_id: int) -> HttpResponse:
    if not (settings.DEBUG or getattr(settings, "ALERTS_DEMO_RECEIVER", False)):
        raise Http404("The demo webhook receiver is off (ALERTS_DEMO_RECEIVER).")
    endpoint = WebhookEndpoint.objects.filter(pk=endpoint_id).first()
    if endpoint is None:
        raise Http404("No such webhook endpoint.")
    body = request.body.decode("utf-8", "replace")
    msg_id = request.headers.get("webhook-id", "")
    if not msg_id or not signature_valid(endpoint=endpoint, msg_id=msg_id,
                                         timestamp=request.headers.get("webhook-timestamp", ""),
                                         signatures=request.headers.get("webhook-signature", ""), body=body):
        logger.warning("demo receiver: endpoint %s refused message %r (bad signature or timestamp)",
                       endpoint_id, msg_id)
        return HttpResponse("invalid signature", status=401, content_type="text/plain")
    try:
        event_type = json.loads(body).get("type", "?")
    except (ValueError, AttributeError):
        event_type = "?"
    logger.info("demo receiver: endpoint %s verified %s (%s)", endpoint_id, msg_id, event_type)
    return HttpResponse(status=204)


urlpatterns = [
    path("demo-receiver/<int:endpoint_id>", demo_receiver, name="alerts-demo-receiver"),
]
