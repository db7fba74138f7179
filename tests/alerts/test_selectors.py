"""Burn-rate projections shown in notices and on account pages."""

from datetime import UTC, date, datetime
from decimal import Decimal

from alerts.selectors import days_until_depletion, projected_depletion_date

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)


def test_depletion_date_counts_whole_and_part_days():
    assert days_until_depletion(Decimal("150"), Decimal("100")) == Decimal("1.500000")
    assert projected_depletion_date(Decimal("150"), Decimal("100"), now=NOW) == date(2026, 12, 2)  # 36 h on
    assert projected_depletion_date(Decimal("10"), Decimal("100"), now=NOW) == date(2026, 11, 30)


def test_no_depletion_date_without_burn_or_beyond_the_calendar():
    assert projected_depletion_date(Decimal("150"), Decimal("0"), now=NOW) is None
    # A millionth of a credit a day against a large balance: trillions of days, not an OverflowError.
    assert projected_depletion_date(Decimal("1000000"), Decimal("0.000001"), now=NOW) is None
    assert projected_depletion_date(Decimal("3000000"), Decimal("1"), now=NOW) is None  # past year 9999
