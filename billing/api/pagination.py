"""Keyset (cursor) pagination: ``?limit=`` (default 50, max 500) and ``?cursor=``.

The cursor is an opaque token carrying the sort key of the last row served;
the next page is ``WHERE key < cursor ORDER BY key DESC LIMIT limit + 1`` (or
ascending), so a page costs one index range scan: no OFFSET, no COUNT.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter

from billing.errors import InvalidRequest

DEFAULT_LIMIT = 50
MAX_LIMIT = 500

PAGE_PARAMETERS = [
    OpenApiParameter("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, OpenApiParameter.QUERY,
                     description=f"Page size, 1..{MAX_LIMIT} (default {DEFAULT_LIMIT})."),
    OpenApiParameter("cursor", OpenApiTypes.STR, OpenApiParameter.QUERY,
                     description="The `next_cursor` of the previous page."),
]


@dataclass
class PageRequest:
    limit: int
    after: int | str | None


def page_request(query_params, *, key_type: type) -> PageRequest:
    raw_limit = query_params.get("limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        if not raw_limit.isascii() or not raw_limit.isdigit() or len(raw_limit) > 4 or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIMIT}.",
                                 details={"limit": f"must be an integer from 1 to {MAX_LIMIT}"})
        limit = int(raw_limit)
    raw_cursor = query_params.get("cursor")
    after = None
    if raw_cursor:
        after = _decode(raw_cursor, key_type)
    return PageRequest(limit=limit, after=after)


def _decode(token: str, key_type: type):
    try:
        padded = token + "=" * (-len(token) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))["k"]
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeError, RecursionError):
        value = None
    valid = (
        (key_type is int and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63)
        or (key_type is str and isinstance(value, str) and 0 < len(value) <= 255 and "\x00" not in value)
    )
    if not valid:
        raise InvalidRequest("cursor is not a cursor this API returned.", details={"cursor": "invalid cursor"})
    return value


def encode_cursor(value) -> str:
    return base64.urlsafe_b64encode(json.dumps({"k": value}).encode()).decode().rstrip("=")


def paginate(queryset: QuerySet, page: PageRequest, *, key: str, descending: bool,
             represent: Callable[[object], dict]) -> dict:
    """One page of ``queryset`` ordered by the unique column ``key``."""
    if page.after is not None:
        queryset = queryset.filter(**{f"{key}__{'lt' if descending else 'gt'}": page.after})
    rows = list(queryset.order_by(f"-{key}" if descending else key)[: page.limit + 1])
    has_more = len(rows) > page.limit
    rows = rows[: page.limit]
    next_cursor = encode_cursor(getattr(rows[-1], key)) if has_more else None
    return {"results": [represent(row) for row in rows], "next_cursor": next_cursor}
