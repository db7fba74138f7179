"""Grants: consumption order (DESIGN.md §3), usability in time and scope,
approvals (maker-checker), adjustments, void and expiry changes."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone

from billing.errors import Conflict, IdempotencyConflict, InvalidRequest, PermissionDenied
from billing.models import Adjustment, CreditGrant, LedgerEntry
from billing.selectors import wallet_balance
from billing.services.grants import (
    adjustment_approve,
    adjustment_reject,
    adjustment_request,
    default_wallet,
    grant_approve,
    grant_create,
    grant_extend_expiry,
    grant_reject,
    grant_void,
)
from billing.services.usage import ChargeRequest, usage_charge
from tests.conftest import assert_ledger_consistent, assert_only_usable_grants_consumed
from tests.factories import UserFactory, funded_wallet, grant, make_customer, make_feature

D = Decimal


def charge(wallet, feature, quantity, event_id, *, now=None):
    return usage_charge(
        ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature, quantity=D(quantity),
                      event_id=event_id),
        now=now,
    )


def approver(username):
    user = UserFactory(username=username)
    user.user_permissions.add(Permission.objects.get(codename="approve_creditgrant"))
    return type(user).objects.get(pk=user.pk)  # fresh: no stale permission cache


def allocation_grants(result):
    return [a["grant"] for a in result.body["allocations"]]


# --- consumption order ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_consumption_order_priority_expiry_cost_basis_effective_creation(feature):
    wallet = default_wallet(make_customer())
    now = timezone.now()
    soon, later = now + timedelta(days=5), now + timedelta(days=10)
    # Created deliberately out of order so that creation order alone cannot explain the result.
    g_never_late = grant(wallet, "1", kind="promotional", effective_at=now - timedelta(days=1))
    g_paid_later = grant(wallet, "1", expires_at=later)
    g_never_early = grant(wallet, "1", kind="promotional", effective_at=now - timedelta(days=2))
    g_free_later = grant(wallet, "1", kind="promotional", expires_at=later)
    g_soon = grant(wallet, "1", expires_at=soon)
    g_never_late_twin = grant(wallet, "1", kind="promotional", effective_at=now - timedelta(days=1))
    g_urgent = grant(wallet, "1", priority=10, expires_at=now + timedelta(days=300))
    g_last = grant(wallet, "1", priority=90, expires_at=now + timedelta(hours=1))
    expected = [g_urgent, g_soon, g_free_later, g_paid_later, g_never_early, g_never_late, g_never_late_twin,
                g_last]
    assert g_free_later.per_unit_cost_basis == 0 < g_paid_later.per_unit_cost_basis

    result = charge(wallet, feature, "8", "all")

    assert result.http_status == 201
    assert allocation_grants(result) == [g.pk for g in expected]
    entries = LedgerEntry.objects.filter(wallet=wallet, type=LedgerEntry.Type.USAGE).order_by("sequence")
    assert [(e.grant_id, e.amount) for e in entries] == [(g.pk, D("-1")) for g in expected]
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_selectors_list_usable_grants_in_the_order_charges_consume_them(feature):
    wallet = default_wallet(make_customer())
    now = timezone.now()
    grants = [
        grant(wallet, "3", expires_at=now + timedelta(days=9)),
        grant(wallet, "3", kind="promotional", expires_at=now + timedelta(days=9)),
        grant(wallet, "3", priority=5),
        grant(wallet, "3", expires_at=now + timedelta(days=2)),
    ]
    listed = [g.pk for g in wallet_balance(wallet).grants]
    assert listed == [g.pk for g in CreditGrant.objects.filter(wallet=wallet).in_consumption_order()]
    result = charge(wallet, feature, "12", "e")
    assert allocation_grants(result) == listed == [grants[2].pk, grants[3].pk, grants[1].pk, grants[0].pk]


@pytest.mark.django_db
def test_partial_charge_takes_first_grant_then_continues_into_next(feature):
    wallet = default_wallet(make_customer())
    first = grant(wallet, "5", priority=1)
    second = grant(wallet, "5", priority=2)
    assert charge(wallet, feature, "3", "a").body["allocations"] == [{"grant": first.pk, "amount": "3.000000"}]
    assert charge(wallet, feature, "4", "b").body["allocations"] == [
        {"grant": first.pk, "amount": "2.000000"}, {"grant": second.pk, "amount": "2.000000"}]
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.remaining, first.status) == (0, CreditGrant.Status.DEPLETED)
    assert (second.remaining, second.status) == (D("3"), CreditGrant.Status.ACTIVE)
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_feature_scoped_grant_only_pays_for_its_feature(feature):
    other = make_feature("image-gen", "1")
    wallet = default_wallet(make_customer())
    scoped = grant(wallet, "10", kind="promotional", feature=other, priority=0)
    general = grant(wallet, "10")

    api = charge(wallet, feature, "4", "api-1")
    assert allocation_grants(api) == [general.pk]
    images = charge(wallet, other, "12", "img-1")
    assert allocation_grants(images) == [scoped.pk, general.pk]
    # The scoped grant does not count for other features' available balance.
    refused = charge(wallet, feature, "5", "api-2")
    assert refused.http_status == 402
    assert refused.body["error"]["details"]["available"] == "4.000000"
    assert wallet_balance(wallet).available == D("4")
    assert_ledger_consistent(wallet)
    assert_only_usable_grants_consumed(wallet)


# --- usable in time ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_grant_past_its_expiry_is_never_consumed_before_the_expiry_job(feature):
    now = timezone.now()
    wallet = default_wallet(make_customer())
    lapsed = grant(wallet, "100", effective_at=now - timedelta(days=10), expires_at=now - timedelta(seconds=1))
    assert lapsed.status == CreditGrant.Status.ACTIVE  # the job has not run

    refused = charge(wallet, feature, "1", "late", now=now)
    assert refused.http_status == 402
    assert D(refused.body["error"]["details"]["available"]) == 0
    fresh = grant(wallet, "5", effective_at=now - timedelta(minutes=1))
    assert allocation_grants(charge(wallet, feature, "5", "ok", now=now)) == [fresh.pk]
    lapsed.refresh_from_db()
    assert lapsed.remaining == D("100")
    assert wallet_balance(wallet, at=now).available == 0
    assert_ledger_consistent(wallet)
    assert_only_usable_grants_consumed(wallet)


@pytest.mark.django_db
def test_grant_expiring_between_charges_stops_being_consumed_at_its_expiry(feature):
    now = timezone.now()
    wallet = default_wallet(make_customer())
    short = grant(wallet, "10", kind="promotional", effective_at=now, expires_at=now + timedelta(hours=1))
    long = grant(wallet, "10", effective_at=now)
    assert allocation_grants(charge(wallet, feature, "2", "before", now=now)) == [short.pk]
    after = now + timedelta(hours=1)  # expires_at <= now: expired (the interval is half-open)
    assert allocation_grants(charge(wallet, feature, "2", "after", now=after)) == [long.pk]
    assert charge(wallet, feature, "9", "too-much", now=after).http_status == 402
    assert_only_usable_grants_consumed(wallet)


@pytest.mark.django_db
def test_grant_not_yet_effective_is_not_consumed(feature):
    now = timezone.now()
    wallet = default_wallet(make_customer())
    future = grant(wallet, "10", effective_at=now + timedelta(days=1), priority=0)
    assert charge(wallet, feature, "1", "early", now=now).http_status == 402
    assert wallet_balance(wallet, at=now).available == 0
    assert wallet_balance(wallet, at=now + timedelta(days=1)).available == D("10")
    assert allocation_grants(charge(wallet, feature, "1", "on-time", now=now + timedelta(days=1))) == [future.pk]
    assert_ledger_consistent(wallet)
    assert_only_usable_grants_consumed(wallet)


@pytest.mark.django_db
def test_voided_and_pending_grants_are_not_consumed(feature, settings):
    settings.CREDITDESK_GRANT_APPROVAL_THRESHOLD = D("100")
    wallet = default_wallet(make_customer())
    voided = grant(wallet, "10", priority=0)
    grant_void(grant_id=voided.pk, reason="mistake")
    pending = grant_create(wallet=wallet, kind="promotional", amount=D("500"))
    assert pending.status == CreditGrant.Status.PENDING_APPROVAL
    assert charge(wallet, feature, "1", "x").http_status == 402
    assert_ledger_consistent(wallet)


# --- approvals -----------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("source", [CreditGrant.Source.MANUAL, CreditGrant.Source.API])
def test_grant_above_threshold_waits_and_adds_nothing(feature, settings, source):
    settings.CREDITDESK_GRANT_APPROVAL_THRESHOLD = D("100")
    wallet = funded_wallet("5")
    requester = approver("maker")
    big = grant_create(wallet=wallet, kind="promotional", amount=D("100.000001"), source=source,
                       requested_by=requester)
    assert (big.status, big.remaining) == (CreditGrant.Status.PENDING_APPROVAL, 0)
    balance = wallet_balance(default_wallet(wallet.customer))
    assert (balance.available, balance.ledger_balance) == (D("5"), D("5"))
    assert not big.entries.exists()
    assert charge(wallet, feature, "6", "too-much").http_status == 402
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_grants_at_threshold_or_paid_for_need_no_approval(settings):
    settings.CREDITDESK_GRANT_APPROVAL_THRESHOLD = D("100")
    wallet = default_wallet(make_customer())
    at_threshold = grant_create(wallet=wallet, kind="promotional", amount=D("100"))
    paid = grant_create(wallet=wallet, kind="prepaid", amount=D("5000"), price_paid=D("500"),
                        source=CreditGrant.Source.PACK_PURCHASE)
    assert at_threshold.status == paid.status == CreditGrant.Status.ACTIVE
    assert wallet_balance(wallet).available == D("5100")


@pytest.mark.django_db
def test_approval_needs_permission_and_a_second_person(feature, settings):
    settings.CREDITDESK_GRANT_APPROVAL_THRESHOLD = D("100")
    wallet = default_wallet(make_customer())
    maker = approver("maker")
    big = grant_create(wallet=wallet, kind="promotional", amount=D("1000"), requested_by=maker)

    with pytest.raises(PermissionDenied):
        grant_approve(grant_id=big.pk, user=maker)  # has the permission, but asked for it
    with pytest.raises(PermissionDenied):
        grant_approve(grant_id=big.pk, user=UserFactory(username="no-perm"))
    with pytest.raises(PermissionDenied):
        grant_approve(grant_id=big.pk, user=None)
    big.refresh_from_db()
    assert big.status == CreditGrant.Status.PENDING_APPROVAL

    checker = approver("checker")
    approved = grant_approve(grant_id=big.pk, user=checker)
    assert (approved.status, approved.remaining, approved.approved_by) == (
        CreditGrant.Status.ACTIVE, D("1000"), checker)
    assert wallet_balance(default_wallet(wallet.customer)).available == D("1000")
    assert charge(wallet, feature, "1000", "use-it").http_status == 201
    with pytest.raises(Conflict):
        grant_approve(grant_id=big.pk, user=approver("third"))  # approving twice credits nothing twice
    assert_ledger_consistent(wallet)
    assert_only_usable_grants_consumed(wallet)


@pytest.mark.django_db
def test_rejected_grant_never_becomes_usable(feature, settings):
    settings.CREDITDESK_GRANT_APPROVAL_THRESHOLD = D("100")
    wallet = default_wallet(make_customer())
    big = grant_create(wallet=wallet, kind="promotional", amount=D("1000"), requested_by=approver("maker"))
    with pytest.raises(PermissionDenied):
        grant_reject(grant_id=big.pk, user=UserFactory(username="no-perm"))
    checker = approver("checker")
    grant_reject(grant_id=big.pk, user=checker, reason="too generous")
    with pytest.raises(Conflict):
        grant_approve(grant_id=big.pk, user=approver("other"))
    with pytest.raises(Conflict):
        grant_void(grant_id=big.pk)
    big.refresh_from_db()
    assert (big.status, big.remaining) == (CreditGrant.Status.REJECTED, 0)
    assert charge(wallet, feature, "1", "x").http_status == 402
    assert wallet_balance(wallet).available == 0
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_approved_grant_repays_overage_first(feature, settings):
    settings.CREDITDESK_GRANT_APPROVAL_THRESHOLD = D("100")
    customer = make_customer(policy="overdraft", credit_limit=D("50"))
    wallet = default_wallet(customer)
    assert charge(wallet, feature, "30", "debt").http_status == 201
    big = grant_create(wallet=wallet, kind="promotional", amount=D("1000"))
    wallet.refresh_from_db()
    assert wallet.overage == D("30")  # pending: repays nothing yet
    grant_approve(grant_id=big.pk, user=approver("checker"))
    wallet.refresh_from_db()
    big.refresh_from_db()
    assert (wallet.overage, wallet.ledger_balance, big.remaining) == (0, D("970"), D("970"))
    assert_ledger_consistent(wallet)


# --- adjustments ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_positive_adjustment_waits_then_becomes_an_adjustment_grant(feature):
    wallet = funded_wallet("10")
    maker, checker = approver("maker"), approver("checker")
    adjustment = adjustment_request(wallet=wallet, amount=D("2.5"), reason="goodwill", requested_by=maker)
    assert adjustment.status == Adjustment.Status.PENDING_APPROVAL
    assert wallet_balance(wallet).available == D("10")
    with pytest.raises(PermissionDenied):
        adjustment_approve(adjustment_id=adjustment.pk, user=maker)
    with pytest.raises(PermissionDenied):
        adjustment_approve(adjustment_id=adjustment.pk, user=UserFactory(username="no-perm"))

    adjustment_approve(adjustment_id=adjustment.pk, user=checker)
    adjustment.refresh_from_db()
    assert adjustment.status == Adjustment.Status.APPLIED
    assert (adjustment.grant.kind, adjustment.grant.remaining) == (CreditGrant.Kind.ADJUSTMENT, D("2.5"))
    assert adjustment.grant.approved_by == checker
    assert wallet_balance(default_wallet(wallet.customer)).available == D("12.5")
    with pytest.raises(Conflict):
        adjustment_approve(adjustment_id=adjustment.pk, user=approver("third"))
    assert CreditGrant.objects.filter(wallet=wallet, kind=CreditGrant.Kind.ADJUSTMENT).count() == 1
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_negative_adjustment_debits_usable_grants_in_consumption_order(feature):
    now = timezone.now()
    wallet = default_wallet(make_customer())
    paid = grant(wallet, "10")
    promo = grant(wallet, "4", kind="promotional")
    scoped = grant(wallet, "50", kind="promotional", feature=make_feature("other", "1"), priority=0)
    lapsed = grant(wallet, "50", priority=0, effective_at=now - timedelta(days=3), expires_at=now - timedelta(days=1))
    adjustment = adjustment_request(wallet=wallet, amount=D("-6"), reason="double grant", requested_by=approver("m"))
    assert wallet_balance(wallet).available == D("14")

    adjustment_approve(adjustment_id=adjustment.pk, user=approver("c"))

    entries = LedgerEntry.objects.filter(wallet=wallet, type=LedgerEntry.Type.ADJUSTMENT).order_by("sequence")
    assert [(e.grant_id, e.amount) for e in entries] == [(promo.pk, D("-4")), (paid.pk, D("-2"))]
    for g in (paid, promo, scoped, lapsed):
        g.refresh_from_db()
    assert (paid.remaining, promo.remaining, scoped.remaining, lapsed.remaining) == (D("8"), 0, D("50"), D("50"))
    assert wallet_balance(wallet).available == D("8")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_negative_adjustment_larger_than_usable_credits_changes_nothing(feature):
    wallet = funded_wallet("5")
    adjustment = adjustment_request(wallet=wallet, amount=D("-6"), reason="oops", requested_by=approver("m"))
    with pytest.raises(Conflict):
        adjustment_approve(adjustment_id=adjustment.pk, user=approver("c"))
    adjustment.refresh_from_db()
    assert adjustment.status == Adjustment.Status.PENDING_APPROVAL
    assert wallet_balance(default_wallet(wallet.customer)).available == D("5")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_rejected_adjustment_changes_nothing(feature):
    wallet = funded_wallet("5")
    adjustment = adjustment_request(wallet=wallet, amount=D("7"), reason="?", requested_by=approver("m"))
    adjustment_reject(adjustment_id=adjustment.pk, user=approver("c"), reason="no")
    with pytest.raises(Conflict):
        adjustment_approve(adjustment_id=adjustment.pk, user=approver("d"))
    assert wallet_balance(default_wallet(wallet.customer)).available == D("5")
    assert_ledger_consistent(wallet)


# --- grant_create idempotency, void, extend ------------------------------------------------------


@pytest.mark.django_db
def test_grant_create_idempotency_key_has_one_effect():
    wallet = default_wallet(make_customer())
    first = grant(wallet, "10", idempotency_key="k1")
    again = grant(wallet, "10", idempotency_key="k1")
    assert again.pk == first.pk
    assert CreditGrant.objects.filter(wallet=wallet).count() == 1
    assert LedgerEntry.objects.filter(wallet=wallet).count() == 1
    assert wallet_balance(default_wallet(wallet.customer)).ledger_balance == D("10")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
@pytest.mark.parametrize("change", [
    {"amount": D("11")}, {"kind": "promotional", "price_paid": D("0")}, {"priority": 10},
    {"price_paid": D("2")},
])
def test_grant_create_same_key_different_payload_is_refused(change):
    wallet = default_wallet(make_customer())
    fields = {"kind": "prepaid", "amount": D("10"), "price_paid": D("1"), "priority": 50} | change
    grant_create(wallet=wallet, kind="prepaid", amount=D("10"), price_paid=D("1"), idempotency_key="k1")
    with pytest.raises(IdempotencyConflict):
        grant_create(wallet=wallet, idempotency_key="k1", **fields)
    assert wallet_balance(default_wallet(wallet.customer)).ledger_balance == D("10")
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_void_takes_the_rest_out_through_one_entry_and_is_idempotent(feature):
    wallet = default_wallet(make_customer())
    doomed = grant(wallet, "10")
    charge(wallet, feature, "3", "a")
    grant_void(grant_id=doomed.pk, reason="fraud")
    grant_void(grant_id=doomed.pk, reason="fraud")
    voids = LedgerEntry.objects.filter(grant=doomed, type=LedgerEntry.Type.VOID)
    assert [e.amount for e in voids] == [D("-7")]
    assert wallet_balance(default_wallet(wallet.customer)).available == 0
    assert charge(wallet, feature, "1", "b").http_status == 402
    assert_ledger_consistent(wallet)


@pytest.mark.django_db
def test_extend_expiry_shows_in_ledger_and_keeps_grant_usable(feature):
    now = timezone.now()
    wallet = default_wallet(make_customer())
    g = grant(wallet, "10", expires_at=now + timedelta(days=1))
    grant_extend_expiry(grant_id=g.pk, expires_at=now + timedelta(days=30), reason="courtesy")
    entry = LedgerEntry.objects.get(grant=g, type=LedgerEntry.Type.EXPIRY_CHANGE)
    assert entry.amount == 0 and "courtesy" in entry.memo
    assert charge(wallet, feature, "1", "later", now=now + timedelta(days=2)).http_status == 201
    with pytest.raises(InvalidRequest):
        grant_extend_expiry(grant_id=g.pk, expires_at=now + timedelta(days=3))
    assert_ledger_consistent(wallet)
