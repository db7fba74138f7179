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

import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from http.client import responses

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse
from rest_framework.renderers import JSONRenderer

from billing.api.auth import ApiKeyRateThrottle
from billing.api.errors import envelope, json_error
from billing.api.inputs import decode_json
from billing.errors import BillingError
from billing.services.api_keys import VerifiedKey, api_key_verify

logger = logging.getLogger("billing.api")
_renderer = JSONRenderer()
_JSON_ACCEPTS = frozenset(("", "*/*", "application/json"))
# A parsed body that the DRF view must see instead (it then answers its 400 itself).
FALLBACK = object()


def render(body: dict, status: int, allow: str) -> HttpResponse:
    """The bytes and headers a DRF ``Response`` of ``body`` gets from this API's views."""
    response = HttpResponse(_renderer.render(body), status=status, content_type="application/json")
    response["Allow"] = allow
    return response


def verified_key(request, scopes: tuple[str, ...]) -> VerifiedKey | None:
    """The request's key when it is well-formed, known, active and holds one of ``scopes``; else None."""
    scheme, _, raw_key = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    raw_key = raw_key.strip()
    if scheme.lower() != "bearer" or not raw_key:
        return None
    key = api_key_verify(raw_key)
    return key if key is not None and key.allows(*scopes) else None


def plain_request(request) -> bool:
    """No query string and an Accept DRF's negotiation would answer with plain JSON."""
    return not request.META.get("QUERY_STRING") and request.META.get("HTTP_ACCEPT", "") in _JSON_ACCEPTS


def json_body(meta: dict, plain_json: bool, read: Callable[[int], bytes]):
    """The parsed JSON body, or FALLBACK when DRF's parser should see it (other media
    type or charset — ``plain_json`` false —, empty, too large to read here, malformed).
    ``read(length)`` gives the body's bytes."""
    if not plain_json:
        return FALLBACK
    try:
        length = int(meta.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return FALLBACK
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if length <= 0 or (limit is not None and length > limit):
        return FALLBACK
    try:
        return decode_json(read(length), "utf-8")
    except ValueError:
        return FALLBACK


class _ThrottleRequest:
    """What ``ApiKeyRateThrottle`` reads from a request."""

    def __init__(self, request, key: VerifiedKey):
        self.auth = key
        self.META = request.META
        self._request = request


def throttled(request, key: VerifiedKey) -> bool:
    """True when the key is over its rate; counts the request otherwise (no rate: never).
    ``request``: anything with the request's ``META``."""
    if not getattr(settings, "CREDITDESK_API_RATE_LIMIT", None):
        return False
    return not ApiKeyRateThrottle().allow_request(_ThrottleRequest(request, key), None)


@dataclass(frozen=True)
class HotRoute:
    """One hot route: the method it serves itself, the scopes, ``handle(body or None,
    **kwargs) -> (status, body)`` and the ``Allow`` header of its DRF view."""

    method: str
    scopes: tuple[str, ...]
    handle: Callable[..., tuple[int, dict]]
    with_body: bool
    allow: str

    def decide(self, request, kwargs: dict, plain_json: bool,
               read: Callable[[int], bytes]) -> tuple[int, dict] | None:
        """(status, body) for an ordinary request — key, body, rate limit, then the handler
        or its ``BillingError`` envelope — or None when the DRF view must answer. ``request``:
        anything with the request's ``META``; ``plain_json``: the body's media type is plain
        ``application/json``; ``read(length)``: the body's bytes."""
        key = verified_key(request, self.scopes)
        if key is None:
            return None
        body = json_body(request.META, plain_json, read) if self.with_body else None
        if body is FALLBACK or throttled(request, key):
            return None
        try:
            return self.handle(body, **kwargs) if self.with_body else self.handle(**kwargs)
        except BillingError as exc:
            return exc.http_status, envelope(exc.code, exc.message, exc.details)

    def answer(self, request: HttpRequest, kwargs: dict) -> HttpResponse | None:
        """The answer to an ordinary request, or None when the DRF view must answer."""
        if request.method != self.method or not plain_request(request):
            return None
        decided = self.decide(request, kwargs, request.content_type == "application/json"
                              and not request.content_params, lambda length: request.body)
        return None if decided is None else render(decided[1], decided[0], self.allow)


def hot_route(drf_view: Callable, allow: str, method: str, scopes: tuple[str, ...],
              handle: Callable[..., tuple[int, dict]], *, with_body: bool) -> Callable:
    """A URL callback: ``handle(body or None, **kwargs) -> (status, body)`` for the
    ordinary request, ``drf_view`` for every other. It carries the DRF view's
    attributes (``cls``, ``initkwargs``, ``csrf_exempt``), so the schema is unchanged,
    and its ``HotRoute`` (``hot``) for ``HotRoutesApplication``."""
    route = HotRoute(method, scopes, handle, with_body, allow)

    def view(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        response = route.answer(request, kwargs)
        return response if response is not None else drf_view(request, *args, **kwargs)

    view.__dict__.update(drf_view.__dict__)
    view.__name__ = getattr(drf_view, "__name__", "view")
    view.__doc__ = drf_view.__doc__
    view.hot = route
    return view


# The paths the hot routes match (as config/urls.py and billing/api/urls.py route them).
_HOT_PATHS = (
    (re.compile(r"/api/v1/usage\Z"), "/api/v1/usage"),
    (re.compile(r"/api/v1/usage/batch\Z"), "/api/v1/usage/batch"),
    (re.compile(r"/api/v1/customers/(?P<external_id>.+)/balance\Z"), "/api/v1/customers/x/balance"),
)


class _Meta:
    """The ``META`` of a request not wrapped in a ``WSGIRequest``: what ``verified_key``,
    ``plain_request`` and the rate throttle read."""

    __slots__ = ("META",)

    def __init__(self, environ: dict):
        self.META = environ


# (X-Forwarded-Host, Host, SERVER_NAME, SERVER_PORT) -> whether Django's get_host() accepts it.
_HOSTS_MAX = 256
_hosts: dict[tuple, bool] = {}


def _host_allowed(environ: dict) -> bool:
    """``HttpRequest.get_host()`` succeeds for this environ (ALLOWED_HOSTS), remembered per host."""
    key = (environ.get("HTTP_X_FORWARDED_HOST"), environ.get("HTTP_HOST"), environ.get("SERVER_NAME"),
           environ.get("SERVER_PORT"))
    allowed = _hosts.get(key)
    if allowed is None:
        request = HttpRequest()
        request.META = {name: value for name, value in zip(
            ("HTTP_X_FORWARDED_HOST", "HTTP_HOST", "SERVER_NAME", "SERVER_PORT"), key, strict=True)
            if value is not None}
        try:
            request.get_host()
            allowed = True
        except DisallowedHost:
            allowed = False
        if len(_hosts) >= _HOSTS_MAX:
            _hosts.clear()
        _hosts[key] = allowed
    return allowed


def _secure(environ: dict) -> bool:
    """``HttpRequest.is_secure()`` for this environ."""
    header = settings.SECURE_PROXY_SSL_HEADER
    if header:
        name, secure_value = header
        value = environ.get(name)
        if value is not None:
            return value.split(",", 1)[0].strip() == secure_value
    return environ.get("wsgi.url_scheme") == "https"


# DRF's JSONRenderer output (compact, UTF-8, no NaN, U+2028/9 escaped) for plain JSON values.
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def render_bytes(body: dict) -> bytes:
    """The bytes ``render(body)`` would carry."""
    try:
        text = _encode(body)
    except TypeError:  # a value only DRF's encoder knows (Decimal, datetime …)
        return _renderer.render(body)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


class HotRoutesApplication:
    """WSGI: the hot routes' ordinary requests go straight to their ``HotRoute``, past
    Django's request and response objects, URL resolving, middleware chain and
    request signals; every other request — and every hot one the route hands back —
    goes to Django unchanged.

    The answer is what the Django path gives, headers included: the headers the
    response middleware adds to an API answer (security, clickjacking) are taken,
    once per kind of request (secure or not), from the real middleware run on a
    sample answer, and Content-Length is the body's. The database connection gets
    the check Django's request signals would give it (closed if unusable or past
    CONN_MAX_AGE). tests/billing/api/test_wsgi_hot_routes.py compares the two.

    ``is_quick(environ)`` tells a server which requests are these (a hot route's
    path and method): ``config.gunicorn_worker`` runs them inline in its event loop."""

    def __init__(self, application: Callable):
        self.application = application
        self._routes: list[tuple[re.Pattern, HotRoute]] | None = None
        self._response_middleware: list | None = None
        self._headers: dict[tuple[bool, str], tuple[list, int]] = {}

    def _setup(self) -> None:
        from django.middleware.clickjacking import XFrameOptionsMiddleware
        from django.middleware.common import CommonMiddleware
        from django.middleware.security import SecurityMiddleware
        from django.urls import resolve

        routes = []
        for pattern, sample in _HOT_PATHS:
            route = getattr(resolve(sample).func, "hot", None)
            if route is not None:  # a route no longer hot is simply left to Django
                routes.append((pattern, route))
        wanted = {"django.middleware.clickjacking.XFrameOptionsMiddleware": XFrameOptionsMiddleware,
                  "django.middleware.common.CommonMiddleware": CommonMiddleware,
                  "django.middleware.security.SecurityMiddleware": SecurityMiddleware}
        # In the order Django runs response middleware: the MIDDLEWARE list reversed.
        self._response_middleware = [wanted[name](lambda request: None) for name in reversed(settings.MIDDLEWARE)
                                     if name in wanted]
        # Request-side middleware work this path does not do (it checks the host itself): none of it configured.
        redirects = settings.SECURE_SSL_REDIRECT or settings.PREPEND_WWW or settings.DISALLOWED_USER_AGENTS
        self._routes = [] if redirects else routes

    def is_quick(self, environ: dict) -> bool:
        """True for a request to a hot route with its method: answered in one short database
        statement (or handed to the route's DRF view, still an API request)."""
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/api/v1/"):
            return False
        if self._routes is None:
            self._setup()
        method = environ.get("REQUEST_METHOD")
        return any(hot.method == method and pattern.match(path) for pattern, hot in self._routes)

    def __call__(self, environ: dict, start_response: Callable):
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/api/v1/") or environ.get("QUERY_STRING") or environ.get("SCRIPT_NAME"):
            return self.application(environ, start_response)
        if self._routes is None:
            self._setup()
        for pattern, hot in self._routes:
            match = pattern.match(path)
            if match is not None:
                return self._serve(hot, match, environ, start_response)
        return self.application(environ, start_response)

    def _response_headers(self, environ: dict, allow: str) -> tuple[list, int]:
        """The headers of a hot answer as the Django path sends them, with the position of
        Content-Length (its value is the body's length)."""
        key = (_secure(environ), allow)
        headers = self._headers.get(key)
        if headers is None:
            from django.core.handlers.wsgi import WSGIRequest

            sample = dict(environ, REQUEST_METHOD="GET", QUERY_STRING="", CONTENT_LENGTH="",
                          **{"wsgi.input": io.BytesIO()})
            request = WSGIRequest(sample)
            response = render({}, 200, allow)
            for middleware in self._response_middleware:
                response = middleware.process_response(request, response)
            items = list(response.items())
            names = [name.lower() for name, _ in items]
            if "content-length" not in names:
                items.append(("Content-Length", ""))
                names.append("content-length")
            headers = self._headers[key] = (items, names.index("content-length"))
        return headers

    def _serve(self, route: HotRoute, match: re.Match, environ: dict, start_response: Callable):
        from django.core.handlers.wsgi import get_path_info
        from django.db import DEFAULT_DB_ALIAS, connections

        if environ.get("REQUEST_METHOD") != route.method or not plain_request(_Meta(environ)):
            return self.application(environ, start_response)
        # Matched on Django's own decoding of the path, as the URL resolver would.
        path = get_path_info(environ)
        match = match.re.match(path)
        if match is None or not _host_allowed(environ):
            return self.application(environ, start_response)
        answer = None
        try:
            answer = self._answer(route, environ, match.groupdict())
        except Exception:
            logger.exception("Unhandled error on %s %s", environ.get("REQUEST_METHOD"), path)
            response = json_error(500, "An unexpected error occurred; it has been logged.")
            answer = (500, response.content)
        finally:
            db = connections[DEFAULT_DB_ALIAS]
            if not db.in_atomic_block:  # (a test's transaction)
                db.close_if_unusable_or_obsolete()
        if answer is None:
            return self.application(environ, start_response)
        status, content = answer
        template, length_at = self._response_headers(environ, route.allow)
        headers = list(template)
        headers[length_at] = (headers[length_at][0], str(len(content)))
        if status == 500:  # json_error's answer: a JsonResponse, no Allow
            headers = [(name, value) for name, value in headers if name != "Allow"]
        start_response(f"{status} {responses.get(status, 'Unknown Status Code')}", headers)
        return [content]

    def _answer(self, route: HotRoute, environ: dict, kwargs: dict) -> tuple[int, bytes] | None:
        """(status, body bytes) for an ordinary request, or None when Django must answer
        (the request's body, if read, is put back for it)."""

        def read(length: int) -> bytes:
            raw = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(raw)  # for Django, should it answer after all
            return raw

        decided = route.decide(_Meta(environ), kwargs, environ.get("CONTENT_TYPE") == "application/json", read)
        return None if decided is None else (decided[0], render_bytes(decided[1]))
