"""Bearer API keys and per-operation scopes.

``Authorization: Bearer <key>``. No key, a malformed, unknown or revoked key:
401 ``unauthorized``. A view lists the scopes that may call each method in
``scopes`` (any one is enough; ``admin`` may do everything); a key without one
of them: 403 ``forbidden``. A view that declares nothing for a method needs
``admin``.
"""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions, throttling

from billing.models import ApiKey
from billing.services.api_keys import VerifiedKey, api_key_verify


class ApiClient:
    """``request.user`` for API requests: the calling key, not a staff user."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, key: VerifiedKey):
        self.key = key

    def __str__(self) -> str:
        return self.key.label


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        raw_key = raw_key.strip()
        if scheme.lower() != "bearer" or not raw_key:
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <API key>'.")
        key = api_key_verify(raw_key)
        if key is None:
            raise exceptions.AuthenticationFailed("Unknown or revoked API key.")
        return ApiClient(key), key

    def authenticate_header(self, request) -> str:
        return self.keyword


class HasScope(permissions.BasePermission):
    """Allow the request when the key holds one of the view's ``scopes[method]``."""

    message = "This API key lacks the scope for this operation."

    def has_permission(self, request, view) -> bool:
        key = request.auth
        if not isinstance(key, VerifiedKey):
            raise exceptions.NotAuthenticated("Send an API key: 'Authorization: Bearer <key>'.")
        method = "GET" if request.method == "HEAD" else request.method
        if method == "OPTIONS" or not hasattr(view, method.lower()):
            return True  # OPTIONS needs only a valid key; an unsupported method gets its 405
        needed = getattr(view, "scopes", {}).get(method) or (ApiKey.Scope.ADMIN,)
        if key.allows(*needed):
            return True
        self.message = f"This API key lacks the scope for this operation (needs one of: {', '.join(needed)})."
        return False


class ApiKeyRateThrottle(throttling.SimpleRateThrottle):
    """Per-key request rate, ``CREDITDESK_API_RATE_LIMIT`` (e.g. ``"6000/minute"``;
    unset: no limit). Counted in the Django cache, so per process unless CACHES
    points at a shared cache. Over the limit: 429 ``rate_limited`` with Retry-After."""

    scope = "api_key"

    def get_rate(self) -> str | None:
        return getattr(settings, "CREDITDESK_API_RATE_LIMIT", None) or None

    def get_cache_key(self, request, view) -> str | None:
        key = request.auth
        return f"throttle:api-key:{key.id}" if isinstance(key, VerifiedKey) else None


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = ApiKeyAuthentication
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from the admin or `manage.py create_api_key`. Scopes: usage:write, "
            "balance:read, admin (admin may do everything).",
        }
