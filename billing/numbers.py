"""One rounding function per kind of quantity (DESIGN.md §2).

Credits carry 6 decimal places, unit credit costs and unit prices 10, money
totals the currency's minor unit. ROUND_HALF_UP everywhere.
"""

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

CREDIT_PLACES = 6
RATE_PLACES = 10
CREDIT_QUANT = Decimal(1).scaleb(-CREDIT_PLACES)
RATE_QUANT = Decimal(1).scaleb(-RATE_PLACES)
ZERO = Decimal("0")

# NUMERIC(20, 6): 14 integer digits.
MAX_CREDITS = Decimal("99999999999999.999999")
MAX_QUANTITY = Decimal("99999999999999.999999")
MAX_RATE = Decimal("9999999999.9999999999")

# ISO 4217 minor units for the currencies that differ from 2.
_MINOR_UNITS = {"JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3}


def round_credits(value: Decimal) -> Decimal:
    return Decimal(value).quantize(CREDIT_QUANT, rounding=ROUND_HALF_UP)


def round_rate(value: Decimal) -> Decimal:
    """Per-unit credit costs and per-credit money (cost basis, unit prices)."""
    return Decimal(value).quantize(RATE_QUANT, rounding=ROUND_HALF_UP)


def minor_units(currency: str) -> int:
    return _MINOR_UNITS.get(currency.upper(), 2)


def round_money(value: Decimal, currency: str) -> Decimal:
    """Quantize a money total to the currency's minor unit."""
    return Decimal(value).quantize(Decimal(1).scaleb(-minor_units(currency)), rounding=ROUND_HALF_UP)


def parse_decimal(value, *, places: int, maximum: Decimal, allow_zero: bool, allow_negative: bool = False) -> Decimal:
    """Parse a user-supplied number strictly: finite, at most ``places`` decimals, within ``maximum``.

    Raises ValueError with a message fit for an API client.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise ValueError("must be a decimal number")
    if isinstance(value, float):
        value = repr(value)
    try:
        number = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise ValueError("must be a decimal number") from None
    if not number.is_finite():
        raise ValueError("must be a finite number")
    if abs(number) > maximum:
        raise ValueError(f"must be at most {maximum}")
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -places and number != number.quantize(Decimal(1).scaleb(-places)):
        raise ValueError(f"must have at most {places} decimal places")
    number = number.quantize(Decimal(1).scaleb(-places))
    if number < 0 and not allow_negative:
        raise ValueError("must not be negative")
    if number == 0 and not allow_zero:
        raise ValueError("must be greater than zero")
    return number
