"""``Idempotency-Key`` for POSTs that move credits outside usage (grants, holds, customers).

The first answer for (operation, key) is stored in ``IdempotencyRecord`` in the
same transaction as its effect, under an advisory lock on the key: concurrent
identical requests run one at a time, the first one acts, the rest replay its
stored status and body. The same key with a different payload is a 409
``idempotency_conflict``. Domain outcomes (2xx, 402, 409) are stored; a 400 is
not, so a client may fix its request and retry with the same key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from django.db import transaction
from drf_spectacular.utils import OpenApiParameter
from rest_framework.response import Response

from billing.api.errors import envelope
from billing.errors import BillingError, IdempotencyConflict, InvalidRequest
from billing.models import IdempotencyRecord
from billing.services.locks import lock_key

HEADER = "Idempotency-Key"
STORED_STATUSES = {402, 409}


def idempotency_parameter(required: bool = True) -> OpenApiParameter:
    return OpenApiParameter(
        HEADER, {"type": "string", "minLength": 1, "maxLength": 255}, OpenApiParameter.HEADER, required=required,
        description="Client id for this effect (1..255 characters). A replay with the same payload returns the "
        "first response; a different payload gets 409 idempotency_conflict.",
    )


def idempotency_key(request, *, required: bool = True) -> str | None:
    key = request.headers.get(HEADER)
    if key is None or key == "":
        if required:
            raise InvalidRequest(f"The {HEADER} header is required for this operation.",
                                 details={HEADER: "required"})
        return None
    if len(key) > 255 or not key.isprintable():
        raise InvalidRequest(f"The {HEADER} header must be 1 to 255 printable characters.",
                             details={HEADER: "must be 1 to 255 printable characters"})
    return key


def payload_hash(payload: dict) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_idempotent(*, operation: str, key: str, payload: dict, perform: Callable[[], tuple[int, dict]]) -> Response:
    """Run ``perform`` (returns status and body) at most once per (operation, key)."""
    digest = payload_hash(payload)
    with transaction.atomic():
        lock_key(operation, key)
        record = IdempotencyRecord.objects.filter(scope=operation, key=key).first()
        if record is not None:
            if record.request_hash != digest:
                raise IdempotencyConflict(
                    f"{HEADER} {key!r} was already used with a different payload.", details={HEADER: key}
                )
            return Response(record.response, status=record.status_code, headers={"Idempotent-Replayed": "true"})
        try:
            status, body = perform()
        except BillingError as exc:
            if exc.http_status not in STORED_STATUSES:
                raise
            status, body = exc.http_status, envelope(exc.code, exc.message, exc.details)
        IdempotencyRecord.objects.create(scope=operation, key=key, request_hash=digest, status_code=status,
                                         response=body)
    return Response(body, status=status)
