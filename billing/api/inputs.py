"""Strict parsing of request input: JSON bodies, decimals, timestamps, ids.

Every failure raises ``InvalidRequest`` (or a DRF ValidationError inside
serializers) whose ``details`` name the offending field, so a malformed request
is a 400, never a 500. Strings are refused if PostgreSQL could not store them
(NUL characters, lone surrogates).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from decimal import Decimal

from django.utils.dateparse import parse_datetime
from drf_spectacular.utils import extend_schema_field
from rest_framework import exceptions, parsers, serializers

from billing.errors import InvalidRequest
from billing.numbers import parse_decimal

MAX_ID_LENGTH = 255
MAX_PROPERTIES_BYTES = 16 * 1024


class DecimalJSONParser(parsers.JSONParser):
    """JSON with numbers kept exact (``Decimal``), NaN/Infinity refused, and any
    decoding failure (bad UTF-8, absurd nesting, huge integers) a 400."""

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", "utf-8")
        try:
            return decode_json(stream.read() if stream is not None else b"", encoding)
        except ValueError as exc:
            raise exceptions.ParseError(f"Malformed JSON body: {exc}"[:300]) from None


def decode_json(raw: bytes, encoding: str = "utf-8"):
    """``raw`` as JSON with exact decimals; any decoding failure is a ValueError."""
    try:
        return json.loads(raw.decode(encoding), parse_float=Decimal, parse_constant=_refuse_constant)
    except ValueError:
        raise
    except (RecursionError, UnicodeError, TypeError) as exc:
        raise ValueError(str(exc)) from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def storable(text: str) -> bool:
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def body_object(data) -> dict:
    """The request body, which must be a JSON object."""
    if isinstance(data, dict):
        return data
    raise InvalidRequest("The request body must be a JSON object.", details={"body": "must be a JSON object"})


def text(data: dict, field: str, *, required: bool = True, max_length: int = MAX_ID_LENGTH,
         default: str | None = None, name: str | None = None) -> str | None:
    """A non-empty string of at most ``max_length`` characters."""
    name = name or field
    value = data.get(field)
    if value is None:
        if required:
            raise InvalidRequest(f"{name} is required.", details={name: "required"})
        return default
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string.", details={name: "must be a string"})
    if not value or len(value) > max_length:
        raise InvalidRequest(f"{name} must be 1 to {max_length} characters.",
                             details={name: f"must be 1 to {max_length} characters"})
    if not storable(value):
        raise InvalidRequest(f"{name} contains characters that cannot be stored.",
                             details={name: "must not contain NUL or unpaired surrogate characters"})
    return value


def decimal(data: dict, field: str, *, places: int, maximum: Decimal, allow_zero: bool, required: bool = True,
            name: str | None = None) -> Decimal | None:
    name = name or field
    value = data.get(field)
    if value is None:
        if required:
            raise InvalidRequest(f"{name} is required.", details={name: "required"})
        return None
    try:
        return parse_decimal(value, places=places, maximum=maximum, allow_zero=allow_zero)
    except ValueError as exc:
        raise InvalidRequest(f"{name} {exc}.", details={name: str(exc)}) from None


def timestamp(value, *, name: str) -> datetime:
    """ISO 8601 with a UTC offset → an aware UTC datetime."""
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidRequest(f"{name} must be an ISO 8601 timestamp string.",
                             details={name: "must be an ISO 8601 timestamp with offset"})
    try:
        parsed = parse_datetime(value.strip())
        if parsed is None or parsed.tzinfo is None or parsed.utcoffset() is None:
            raise ValueError
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{name} must be an ISO 8601 timestamp with a UTC offset.",
                             details={name: "must be an ISO 8601 timestamp with offset, e.g. 2026-01-31T12:00:00Z"}
                             ) from None


def optional_timestamp(data: dict, field: str) -> datetime | None:
    value = data.get(field)
    return None if value is None else timestamp(value, name=field)


def properties(data: dict, field: str = "properties", *, name: str | None = None) -> dict:
    """A JSON object of at most 16 KB; numbers become plain JSON numbers (finite only)."""
    name = name or field
    value = data.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be a JSON object.", details={name: "must be a JSON object"})
    try:
        cleaned = _plain_json(value)
        size = len(json.dumps(cleaned, separators=(",", ":"), allow_nan=False).encode())
    except (ValueError, RecursionError):
        raise InvalidRequest(f"{name} holds values that cannot be stored.",
                             details={name: "numbers must be finite; strings must not contain NUL characters"}
                             ) from None
    if size > MAX_PROPERTIES_BYTES:
        raise InvalidRequest(f"{name} is larger than {MAX_PROPERTIES_BYTES} bytes.",
                             details={name: f"must be at most {MAX_PROPERTIES_BYTES} bytes as JSON"})
    return cleaned


def _plain_json(value):
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not storable(key):
                raise ValueError("key")
            out[key] = _plain_json(item)
        return out
    if isinstance(value, list):
        return [_plain_json(item) for item in value]
    if isinstance(value, Decimal):
        # Usage ``properties`` are the client's free-form labels (team, model …),
        # never credits or money: plain JSON numbers are what they get back.
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("number")
        return int(value) if value == value.to_integral_value() and abs(value) < 2**53 else number
    if isinstance(value, str) and not storable(value):
        raise ValueError("string")
    return value


# --- Serializer fields (cold endpoints validate with DRF serializers) ---------

@extend_schema_field({
    "type": "string", "format": "decimal", "pattern": r"^-?\d+(\.\d+)?$", "example": "12.500000",
    "description": "A decimal string (a JSON number is accepted on input).",
})
class DecimalStringField(serializers.Field):
    """A decimal sent as a string or JSON number, returned as a string; parsed by ``parse_decimal``."""

    def __init__(self, *, places: int, maximum: Decimal, allow_zero: bool = False, **kwargs):
        self.places, self.maximum, self.allow_zero = places, maximum, allow_zero
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        try:
            return parse_decimal(data, places=self.places, maximum=self.maximum, allow_zero=self.allow_zero)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def to_representation(self, value):
        # Fixed-point always: str() would give "0E-10" or "1.000E-7" for small rates (10 places).
        return format(Decimal(value).quantize(Decimal(1).scaleb(-self.places)), "f")


class AwareDateTimeField(serializers.DateTimeField):
    """ISO 8601 with an explicit offset on input; UTC ISO 8601 on output."""

    def to_internal_value(self, value):
        try:
            return timestamp(value, name=self.field_name or "timestamp")
        except InvalidRequest as exc:
            raise serializers.ValidationError(next(iter(exc.details.values()))) from None

    def to_representation(self, value):
        return iso(value)


class StrictIntegerField(serializers.IntegerField):
    """An integer JSON number only (no strings, booleans or fractions)."""

    def to_internal_value(self, data):
        if isinstance(data, Decimal) and data == data.to_integral_value() and abs(data) < 10**18:
            data = int(data)
        if isinstance(data, bool) or not isinstance(data, int):
            raise serializers.ValidationError("must be an integer")
        return super().to_internal_value(data)


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()
