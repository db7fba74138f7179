"""Pricing usage with the rate card (DESIGN.md §3 "Usage event", "Features and
credit costs"): the version effective at occurred_at, customer override first,
rounded once, the version kept on the event."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import FeatureCost, LedgerEntry, UsageEvent
from billing.services.usage import ChargeRequest, usage_charge
from tests.conftest import assert_ledger_consistent
from tests.factories import FeatureFactory, funded_wallet, grant

D = Decimal


def charge(wallet, feature, quantity, event_id, *, occurred_at=None, now=None):
    return usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                      quantity=D(quantity), event_id=event_id, occurred_at=occurred_at), now=now)


@pytest.fixture
def now():
    return timezone.now()


@pytest.fixture
def priced(db, now):
    """A feature whose cost was 2 from ten days ago and 3 from five days ago."""
    feature = FeatureFactory(key="llm-tokens")
    old = FeatureCost.objects.create(feature=feature, credits_per_unit=D("2"), effective_from=now - timedelta(days=10))
    new = FeatureCost.objects.create(feature=feature, credits_per_unit=D("3"), effective_from=now - timedelta(days=5))
    return feature, old, new


@pytest.mark.django_db
def test_credits_use_the_version_effective_at_occurred_at(priced, now):
    feature, old, new = priced
    wallet = funded_wallet("1000")
    week_ago = charge(wallet, feature, "10", "a", occurred_at=now - timedelta(days=7))
    yesterday = charge(wallet, feature, "10", "b", occurred_at=now - timedelta(days=1))
    at_switch = charge(wallet, feature, "10", "c", occurred_at=now - timedelta(days=5))
    assert (week_ago.credits, yesterday.credits, at_switch.credits) == (D("20"), D("30"), D("30"))
    events = {e.event_id: e for e in UsageEvent.objects.filter(wallet=wallet)}
    assert (events["a"].rate_id, events["a"].credits_per_unit) == (old.pk, D("2"))
    assert (events["b"].rate_id, events["b"].credits_per_unit) == (new.pk, D("3"))
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_customer_override_wins_when_effective(priced, now):
    feature, _, card = priced
    wallet, other = funded_wallet("1000"), funded_wallet("1000")
    override = FeatureCost.objects.create(feature=feature, customer=wallet.customer, credits_per_unit=D("1.5"),
                                          effective_from=now - timedelta(days=6))
    assert charge(wallet, feature, "10", "a", occurred_at=now - timedelta(days=1)).credits == D("15")
    # Before the override took effect: the rate card of that time.
    assert charge(wallet, feature, "10", "b", occurred_at=now - timedelta(days=8)).credits == D("20")
    assert charge(other, feature, "10", "a", occurred_at=now - timedelta(days=1)).credits == D("30")
    assert UsageEvent.objects.get(customer=wallet.customer, event_id="a").rate_id == override.pk
    assert UsageEvent.objects.get(customer=other.customer, event_id="a").rate_id == card.pk


@pytest.mark.django_db
def test_new_version_does_not_change_past_charges(priced, now):
    feature, _, new = priced
    wallet = funded_wallet("1000")
    first = charge(wallet, feature, "4", "past", occurred_at=now - timedelta(hours=1))
    FeatureCost.objects.create(feature=feature, credits_per_unit=D("100"), effective_from=now - timedelta(minutes=1))
    event = UsageEvent.objects.get(wallet=wallet, event_id="past")
    assert (event.credits, event.rate_id) == (D("12"), new.pk)
    assert LedgerEntry.objects.get(usage_event=event).amount == D("-12")
    replay = charge(wallet, feature, "4", "past", occurred_at=now - timedelta(hours=1))
    assert (replay.status, replay.body) == ("duplicate", first.body)
    assert charge(wallet, feature, "4", "now").credits == D("400")


@pytest.mark.django_db
@pytest.mark.parametrize(("quantity", "rate", "credits"), [
    ("5", "0.0000005", "0.000003"),          # a tie rounds half up (half-even would give 0.000002)
    ("1", "0.0000004999", "0.000000"),
    ("3", "0.3333333333", "1.000000"),       # 0.9999999999 -> 1.000000
    ("0.000001", "0.5", "0.000001"),
    ("7", "0.1428571429", "1.000000"),
    ("123456.789012", "0.0000123457", "1.524160"),  # 1.52416048...
])
def test_credits_are_rounded_half_up_to_six_places_once_per_event(quantity, rate, credits):
    feature = FeatureFactory(key="metered")
    FeatureCost.objects.create(feature=feature, credits_per_unit=D(rate),
                               effective_from=timezone.now() - timedelta(days=1))
    wallet = funded_wallet("100")
    result = charge(wallet, feature, quantity, "e")
    assert result.credits == D(credits)
    assert result.body["credits"] == credits
    assert UsageEvent.objects.get(wallet=wallet).credits == D(credits)
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_rounding_happens_once_not_per_grant(now):
    feature = FeatureFactory(key="thirds")
    FeatureCost.objects.create(feature=feature, credits_per_unit=D("0.3333333333"),
                               effective_from=now - timedelta(days=1))
    wallet = funded_wallet("0")
    for priority in (1, 2, 3):
        grant(wallet, "0.333333", kind="promotional", priority=priority)
    grant(wallet, "10", priority=4)
    result = charge(wallet, feature, "4", "spans")  # 1.3333333332 -> 1.333333
    assert result.credits == D("1.333333")
    amounts = [D(a["amount"]) for a in result.body["allocations"]]
    assert amounts == [D("0.333333")] * 3 + [D("0.333334")]
    assert sum(amounts) == result.credits
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_no_cost_effective_at_occurred_at_is_invalid_and_charges_nothing(priced, now):
    feature, _, _ = priced
    wallet = funded_wallet("100")
    result = charge(wallet, feature, "1", "too-early", occurred_at=now - timedelta(days=11))
    assert result.http_status == 400
    assert result.body["error"]["code"] == "invalid_request"
    assert not UsageEvent.objects.filter(wallet=wallet).exists()
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_priced_amount_beyond_what_a_ledger_can_hold_is_refused_cleanly(now):
    feature = FeatureFactory(key="pricey")
    FeatureCost.objects.create(feature=feature, credits_per_unit=D("1000"), effective_from=now - timedelta(days=1))
    wallet = funded_wallet("100")
    result = charge(wallet, feature, "99999999999999", "huge")
    assert result.http_status in (400, 402)
    assert result.status in ("invalid", "rejected")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_insufficient_credits_details_are_six_place_strings_even_for_an_empty_wallet(feature):
    wallet = funded_wallet("0")
    refused = charge(wallet, feature, "1", "nothing-there")
    assert refused.http_status == 402
    assert refused.body["error"]["details"]["available"] == "0.000000"
    assert refused.body["error"]["details"]["required"] == "1.000000"
