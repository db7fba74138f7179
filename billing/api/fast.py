"""The hot routes without DRF's per-request machinery, same contract.

A hot route (``POST /usage``, ``POST /usage/batch``, ``GET …/balance``) is a
plain Django view that serves the ordinary request itself — a well-formed
``Authorization: Bearer`` key holding the scope, a JSON body (``application/json``
without parameters), no ``Accept`` other than JSON, no query string — and hands
every other request, untouched, to the route's DRF view. So every refusal of
auth, scope, media type, negotiation or malformed JSON is produced by the same
DRF code as everywhere else; the fast path only ever answers with what the
shared handler returns (``billing.api.usage`` / ``customers``), a
``BillingError`` envelope rendered exactly as ``billing.api.errors`` does, or a
500 envelope from ``ApiErrorEnvelopeMiddleware``. The per-key rate limit, when
set, is checked last with the same throttle class, so a request is counted once.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from rest_framework.renderers import JSONRenderer

from billing.api.auth import ApiKeyRateThrottle
from billing.api.errors import envelope
from billing.api.inputs import decode_json
from billing.errors import BillingError
from billing.services.api_keys import VerifiedKey, api_key_verify

_renderer = JSONRenderer()
_JSON_ACCEPTS = frozenset(("", "*/*", "application/json"))
# A parsed body that the DRF view must see instead (it then answers its 400 itself).
FALLBACK = object()


def render(body: dict, status: int, allow: str) -> HttpResponse:
    """The bytes and headers a DRF ``Response`` of ``body`` gets from this API's views."""
    response = HttpResponse(_renderer.render(body), status=status, content_type="application/json")
    response["Allow"] = allow
    return response


def verified_key(request: HttpRequest, scopes: tuple[str, ...]) -> VerifiedKey | None:
    """The request's key when it is well-formed, known, active and holds one of ``scopes``; else None."""
    scheme, _, raw_key = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    raw_key = raw_key.strip()
    if scheme.lower() != "bearer" or not raw_key:
        return None
    key = api_key_verify(raw_key)
    return key if key is not None and key.allows(*scopes) else None


def plain_request(request: HttpRequest) -> bool:
    """No query string and an Accept DRF's negotiation would answer with plain JSON."""
    return not request.META.get("QUERY_STRING") and request.META.get("HTTP_ACCEPT", "") in _JSON_ACCEPTS


def json_body(request: HttpRequest):
    """The parsed JSON body, or FALLBACK when DRF's parser should see it (other media
    type or charset, empty, too large to read here, malformed)."""
    if request.content_type != "application/json" or request.content_params:
        return FALLBACK
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return FALLBACK
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if length <= 0 or (limit is not None and length > limit):
        return FALLBACK
    try:
        return decode_json(request.body, "utf-8")
    except ValueError:
        return FALLBACK


class _ThrottleRequest:
    """What ``ApiKeyRateThrottle`` reads from a request."""

    def __init__(self, request: HttpRequest, key: VerifiedKey):
        self.auth = key
        self.META = request.META
        self._request = request


def throttled(request: HttpRequest, key: VerifiedKey) -> bool:
    """True when the key is over its rate; counts the request otherwise (no rate: never)."""
    if not getattr(settings, "CREDITDESK_API_RATE_LIMIT", None):
        return False
    return not ApiKeyRateThrottle().allow_request(_ThrottleRequest(request, key), None)


def hot_route(drf_view: Callable, allow: str, method: str, scopes: tuple[str, ...],
              handle: Callable[..., tuple[int, dict]], *, with_body: bool) -> Callable:
    """A URL callback: ``handle(body or None, **kwargs) -> (status, body)`` for the
    ordinary request, ``drf_view`` for every other. It carries the DRF view's
    attributes (``cls``, ``initkwargs``, ``csrf_exempt``), so the schema is unchanged."""

    def view(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if request.method != method or not plain_request(request):
            return drf_view(request, *args, **kwargs)
        key = verified_key(request, scopes)
        if key is None:
            return drf_view(request, *args, **kwargs)
        body = json_body(request) if with_body else None
        if body is FALLBACK or throttled(request, key):
            return drf_view(request, *args, **kwargs)
        try:
            status, answer = handle(body, **kwargs) if with_body else handle(**kwargs)
        except BillingError as exc:
            status, answer = exc.http_status, envelope(exc.code, exc.message, exc.details)
        return render(answer, status, allow)

    view.__dict__.update(drf_view.__dict__)
    view.__name__ = getattr(drf_view, "__name__", "view")
    view.__doc__ = drf_view.__doc__
    return view
