"""Reservations (DESIGN.md §3): a hold counts against available balance while
open and unexpired, is captured as one usage charge or released, and an
expired hold never blocks — before or after the release job."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.errors import Conflict, IdempotencyConflict, InsufficientCredits, InvalidRequest
from billing.models import LedgerEntry, Reservation, UsageEvent, Wallet
from billing.selectors import wallet_balance
from billing.services.reservations import (
    reservation_capture,
    reservation_create,
    reservation_release,
    reservations_expire_due,
)
from billing.services.usage import ChargeRequest, usage_charge
from tests.conftest import assert_ledger_consistent, assert_only_usable_grants_consumed
from tests.factories import funded_wallet, grant, make_feature

D = Decimal


def hold(wallet, amount=None, *, now=None, **kwargs):
    return reservation_create(customer=wallet.customer, wallet_id=wallet.pk,
                              amount=D(amount) if amount is not None else None, now=now, **kwargs)


def charge(wallet, feature, quantity, event_id, *, now=None):
    return usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                      quantity=D(quantity), event_id=event_id), now=now)


def available(wallet, at=None):
    return wallet_balance(Wallet.objects.get(pk=wallet.pk), at=at).available


@pytest.mark.django_db
def test_open_hold_reduces_available_and_blocks_charges_beyond_it(feature):
    wallet = funded_wallet("100")
    held = hold(wallet, "70")
    assert (held.status, held.amount) == ("open", D("70"))
    assert available(wallet) == D("30")
    refused = charge(wallet, feature, "31", "too-much")
    assert refused.http_status == 402
    assert D(refused.body["error"]["details"]["available"]) == D("30")
    assert charge(wallet, feature, "30", "fits").http_status == 201
    with pytest.raises(InsufficientCredits):
        hold(wallet, "0.000001")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_expired_hold_never_blocks_even_before_the_job_runs(feature):
    wallet = funded_wallet("100")
    now = timezone.now()
    held = hold(wallet, "100", ttl_seconds=60, now=now)
    assert charge(wallet, feature, "1", "during", now=now + timedelta(seconds=59)).http_status == 402
    after = now + timedelta(seconds=60)
    assert available(wallet, at=after) == D("100")
    assert hold(wallet, "50", now=after).status == "open"
    assert charge(wallet, feature, "50", "after", now=after).http_status == 201
    held.refresh_from_db()
    assert held.status == "open"  # still not marked: it simply stopped counting
    with pytest.raises(InsufficientCredits):
        hold(wallet, "0.000001", now=after)
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
@pytest.mark.parametrize(("captured", "left"), [("40", "60"), ("0.5", "99.5"), ("55", "45")])
def test_capture_charges_once_and_frees_the_whole_hold(feature, captured, left):
    wallet = funded_wallet("100")
    held = hold(wallet, "50")
    result = reservation_capture(reservation=held, event_id="job-1", amount=D(captured))
    assert result.http_status == 201
    assert result.credits == D(captured)
    held.refresh_from_db()
    assert held.status == "captured" and held.usage_event.event_id == "job-1"
    assert available(wallet) == D(left)
    assert LedgerEntry.objects.filter(wallet=wallet, type="usage").count() == 1
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_capture_by_quantity_uses_the_holds_feature_and_scoped_grants():
    images = make_feature("images", "2.5")
    wallet = funded_wallet("10")
    scoped = grant(wallet, "20", kind="promotional", feature=images)
    held = hold(wallet, feature=images, quantity=D("10"))  # 25 credits: needs the scoped grant
    assert held.amount == D("25")
    result = reservation_capture(reservation=held, event_id="render", quantity=D("8"))
    assert result.credits == D("20")
    assert result.body["allocations"][0] == {"grant": scoped.pk, "amount": "20.000000"}
    assert UsageEvent.objects.get(event_id="render").feature == images
    assert_ledger_consistent(wallet)
    assert_only_usable_grants_consumed(wallet)


@pytest.mark.django_db
def test_capture_that_does_not_fit_is_refused_and_the_hold_stays_open(feature):
    wallet = funded_wallet("100")
    held = hold(wallet, "50")
    refused = reservation_capture(reservation=held, event_id="job", amount=D("100.5"))
    assert refused.http_status == 402
    held.refresh_from_db()
    assert held.status == "open"
    assert available(wallet) == D("50")
    assert reservation_capture(reservation=held, event_id="job-2", amount=D("100")).http_status == 201
    assert available(wallet) == 0
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_capture_replay_and_second_capture(feature):
    wallet = funded_wallet("100")
    held = hold(wallet, "10")
    first = reservation_capture(reservation=held, event_id="job", amount=D("7"))
    replay = reservation_capture(reservation=held, event_id="job", amount=D("7"))
    assert (replay.http_status, replay.body) == (201, first.body)
    second = reservation_capture(reservation=held, event_id="job-again", amount=D("7"))
    assert (second.http_status, second.body["error"]["code"]) == (409, "conflict")
    assert Wallet.objects.get(pk=wallet.pk).ledger_balance == D("93")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_capture_after_expiry_or_release_is_a_conflict(feature):
    wallet = funded_wallet("100")
    now = timezone.now()
    expired = hold(wallet, "10", ttl_seconds=30, now=now)
    result = reservation_capture(reservation=expired, event_id="late", amount=D("5"),
                                 now=now + timedelta(seconds=31))
    assert (result.http_status, result.body["error"]["code"]) == (409, "conflict")
    released = hold(wallet, "10")
    reservation_release(reservation_id=released.pk)
    result = reservation_capture(reservation=released, event_id="after-release", amount=D("5"))
    assert result.http_status == 409
    assert Wallet.objects.get(pk=wallet.pk).ledger_balance == D("100")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_release_is_idempotent_and_refused_after_capture(feature):
    wallet = funded_wallet("100")
    now = timezone.now()
    held = hold(wallet, "30", now=now)
    assert reservation_release(reservation_id=held.pk, now=now).status == "released"
    assert reservation_release(reservation_id=held.pk, now=now).status == "released"
    assert available(wallet) == D("100")
    lapsed = hold(wallet, "30", ttl_seconds=10, now=now)
    assert reservation_release(reservation_id=lapsed.pk, now=now + timedelta(seconds=11)).status == "expired"
    captured = hold(wallet, "5")
    reservation_capture(reservation=captured, event_id="x", amount=D("5"))
    with pytest.raises(Conflict):
        reservation_release(reservation_id=captured.pk)


@pytest.mark.django_db
def test_expiry_job_marks_lapsed_holds_and_keeps_open_ones(feature):
    wallet = funded_wallet("100")
    now = timezone.now()
    lapsed, live = hold(wallet, "20", ttl_seconds=60, now=now), hold(wallet, "20", ttl_seconds=600, now=now)
    assert reservations_expire_due(now=now + timedelta(seconds=120)) == 1
    lapsed.refresh_from_db()
    live.refresh_from_db()
    assert (lapsed.status, live.status) == ("expired", "open")
    assert available(wallet, at=now + timedelta(seconds=120)) == D("80")


@pytest.mark.django_db
def test_overdraft_hold_may_use_the_credit_limit(feature):
    wallet = funded_wallet("10", policy=Wallet.Policy.OVERDRAFT, credit_limit="20")
    held = hold(wallet, "25")
    assert available(wallet) == D("5")
    result = reservation_capture(reservation=held, event_id="big-job", amount=D("28"))
    assert result.http_status == 201
    wallet = Wallet.objects.get(pk=wallet.pk)
    assert (wallet.overage, wallet.ledger_balance) == (D("18"), D("-18"))
    with pytest.raises(InsufficientCredits):
        hold(wallet, "2.000001")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
@pytest.mark.parametrize("kwargs", [
    {"amount": "0"}, {"amount": "-5"}, {"amount": "1", "ttl_seconds": 0},
    {"amount": "1", "ttl_seconds": 10**9}, {},
])
def test_bad_holds_are_invalid(kwargs):
    wallet = funded_wallet("100")
    with pytest.raises(InvalidRequest):
        hold(wallet, **kwargs)
    assert not Reservation.objects.exists()


@pytest.mark.django_db
def test_hold_idempotency_key_holds_once():
    wallet = funded_wallet("100")
    first = hold(wallet, "60", idempotency_key="job-7")
    again = hold(wallet, "60", idempotency_key="job-7")
    assert again.pk == first.pk
    assert available(wallet) == D("40")
    with pytest.raises(IdempotencyConflict):
        hold(wallet, "10", idempotency_key="job-7")
    assert Reservation.objects.count() == 1
