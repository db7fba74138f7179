"""Fixtures for the alerts tests: eager Celery, charging helpers, local HTTP
stand-ins (a Standard Webhooks receiver and Twilio's Messages API) on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest

from alerts.models import AlertLevel, AlertRule
from billing.services.grants import default_wallet
from billing.services.usage import ChargeRequest, usage_charge
from config.celery import app as celery_app


@pytest.fixture(autouse=True)
def eager_celery(settings):
    """Run tasks in the calling thread (a real worker is not the point here).
    Eager errors are not propagated: that is how Celery lets an eager task's
    ``self.retry`` run the retry in place; outcomes are asserted on the rows."""
    settings.CELERY_TASK_ALWAYS_EAGER = True
    previous = celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = False
    yield
    celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = previous


def make_rule(*levels, scope=AlertRule.Scope.GLOBAL, **fields) -> AlertRule:
    """``levels``: (kind, value, severity) tuples or (value, severity) for absolute levels."""
    rule = AlertRule.objects.create(name=fields.pop("name", "Default"), scope=scope, **fields)
    for level in levels:
        kind, value, severity = level if len(level) == 3 else (AlertLevel.Kind.ABSOLUTE, *level)
        AlertLevel.objects.create(rule=rule, kind=kind, value=Decimal(str(value)), severity=severity)
    return rule


def charge(customer, feature, quantity, *, event_id: str | None = None, now=None):
    wallet = default_wallet(customer)
    return usage_charge(ChargeRequest(customer=customer, wallet_id=wallet.pk, feature=feature,
                                      quantity=Decimal(str(quantity)), event_id=event_id or uuid.uuid4().hex),
                        now=now)


class _Recorder:
    def __init__(self):
        self.requests: list[dict] = []
        self.responses: list[tuple[int, str]] = []  # consumed in order; then default
        self.default = (200, '{"ok": true}')
        self.lock = threading.Lock()

    def next_response(self) -> tuple[int, str]:
        with self.lock:
            return self.responses.pop(0) if self.responses else self.default


def _serve(handler_factory):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_factory)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def webhook_receiver():
    """A real HTTP receiver: records each request's headers and body and answers
    with the queued responses (then 200)."""
    recorder = _Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            recorder.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            status, text = recorder.next_response()
            payload = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server, thread = _serve(Handler)
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    yield recorder
    server.shutdown()
    server.server_close()


@pytest.fixture
def twilio_standin():
    """Twilio's Messages API, as far as sending an SMS goes."""
    recorder = _Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            auth = self.headers.get("Authorization", "")
            user = base64.b64decode(auth.split(" ", 1)[1]).decode() if auth.startswith("Basic ") else ""
            form = {k: v[0] for k, v in parse_qs(body).items()}
            recorder.requests.append({"path": self.path, "auth": user, "form": form})
            status, text = recorder.next_response()
            if status == 201 and text == "auto":
                sid = f"SM{uuid.uuid4().hex}"
                text = json.dumps({"sid": sid, "status": "queued", "to": form.get("To"), "from": form.get("From"),
                                   "body": form.get("Body"), "account_sid": "ACtest"})
            payload = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    recorder.default = (201, "auto")
    server, thread = _serve(Handler)
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield recorder
    server.shutdown()
    server.server_close()
