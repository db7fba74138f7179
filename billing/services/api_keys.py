"""API keys: created once (the raw key is shown a single time), stored as a hash, revocable.

A raw key reads ``cdk_<prefix>_<secret>``. Only the prefix (to find the row)
and the SHA-256 of the whole raw key are stored; verification compares hashes
in constant time. ``api_key_verify`` keeps a short in-process cache of good
keys so the usage hot path does not pay a query per request; revoking a key
clears this process's cache at once and every other process's within
``CACHE_SECONDS``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from billing.errors import InvalidRequest, NotFound
from billing.models import ApiKey
from billing.services.audit import audit_record

KEY_PREFIX = "cdk"
CACHE_SECONDS = 5.0
LAST_USED_EVERY = timedelta(minutes=1)
ALL_SCOPES = tuple(ApiKey.Scope.values)


@dataclass(frozen=True)
class VerifiedKey:
    """What a request needs to know about the key that made it."""

    id: int
    name: str
    scopes: frozenset[str]

    def allows(self, *scopes: str) -> bool:
        """True if the key has any of ``scopes``; ``admin`` may do everything."""
        return ApiKey.Scope.ADMIN in self.scopes or any(scope in self.scopes for scope in scopes)

    @property
    def label(self) -> str:
        return f"api-key:{self.name}"[:150]


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8", "surrogatepass")).hexdigest()


def api_key_create(*, name: str, scopes: list[str], created_by=None) -> tuple[ApiKey, str]:
    """Create a key with ``scopes`` and return it with the raw key, which is never stored or shown again."""
    name = (name or "").strip()
    if not name or len(name) > 120:
        raise InvalidRequest("A key needs a name of 1 to 120 characters.", details={"name": "1..120 characters"})
    unknown = sorted(set(scopes) - set(ALL_SCOPES))
    if unknown or not scopes:
        raise InvalidRequest(
            f"Scopes must be some of {', '.join(ALL_SCOPES)}.", details={"scopes": f"unknown: {unknown}" if unknown
                                                                     else "give at least one"}
        )
    ordered = [scope for scope in ALL_SCOPES if scope in scopes]
    for _ in range(5):
        prefix = secrets.token_hex(6)
        raw_key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
        try:
            with transaction.atomic():
                api_key = ApiKey.objects.create(
                    name=name, prefix=prefix, hashed_key=hash_key(raw_key), scopes=ordered,
                    created_by=created_by if getattr(created_by, "is_authenticated", False) else None,
                )
                audit_record(actor=created_by, action="api_key.create", obj=api_key, changes={"scopes": ordered})
            return api_key, raw_key
        except IntegrityError:  # prefix collision: draw again
            continue
    raise RuntimeError("Could not draw a unique API key prefix.")


def api_key_revoke(*, api_key_id: int, actor=None, now: datetime | None = None) -> ApiKey:
    """Revoke a key; requests with it are refused from then on. Revoking twice is a no-op."""
    with transaction.atomic():
        api_key = ApiKey.objects.select_for_update().filter(pk=api_key_id).first()
        if api_key is None:
            raise NotFound("No such API key.")
        if api_key.revoked_at is None:
            api_key.revoked_at = now or timezone.now()
            api_key.save(update_fields=["revoked_at"])
            audit_record(actor=actor, action="api_key.revoke", obj=api_key)
    _cache_clear()
    return api_key


_cache: dict[str, tuple[float, VerifiedKey]] = {}
_last_used: dict[int, float] = {}
_cache_lock = threading.Lock()


def _cache_clear() -> None:
    with _cache_lock:
        _cache.clear()


def api_key_verify(raw_key: str) -> VerifiedKey | None:
    """The active key matching ``raw_key``, or None. One query on a cache miss;
    ``last_used_at`` is written at most once a minute per key and process."""
    parts = raw_key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not 1 <= len(parts[1]) <= 16 or len(raw_key) > 200:
        return None
    digest = hash_key(raw_key)
    clock = time.monotonic()
    cached = _cache.get(digest)
    if cached is not None and cached[0] > clock:
        verified = cached[1]
    else:
        row = ApiKey.objects.filter(prefix=parts[1]).values_list("pk", "name", "hashed_key", "scopes",
                                                                 "revoked_at").first()
        if row is None or row[4] is not None or not hmac.compare_digest(row[2], digest):
            return None
        verified = VerifiedKey(id=row[0], name=row[1], scopes=frozenset(row[3] or ()))
        with _cache_lock:
            _cache[digest] = (clock + CACHE_SECONDS, verified)
    if clock - _last_used.get(verified.id, float("-inf")) >= LAST_USED_EVERY.total_seconds():
        _last_used[verified.id] = clock
        ApiKey.objects.filter(pk=verified.id).update(last_used_at=timezone.now())
    return verified
