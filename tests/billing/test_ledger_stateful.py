"""Hypothesis stateful test: random sequences of ledger operations against the
real services and PostgreSQL, checked after every step against a small
in-memory model of DESIGN.md §3 (consumption order, usability in time and
scope, holds, overdraft) and against invariants 1–3 of §4.

The clock is the model's: ``django.utils.timezone.now`` returns it while an
example runs, and every service that takes ``now`` gets it explicitly. Each
example runs inside a savepoint that is rolled back afterwards, with a fresh
customer."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from billing.errors import Conflict, InsufficientCredits
from billing.models import CreditGrant, Feature, Reservation, Wallet
from billing.numbers import ZERO, round_credits, round_rate
from billing.selectors import wallet_balance
from billing.services.grants import (
    customer_create,
    default_wallet,
    grant_approve,
    grant_create,
    grant_reject,
    grant_void,
    grants_expire_due,
)
from billing.services.reservations import (
    reservation_capture,
    reservation_create,
    reservation_release,
    reservations_expire_due,
)
from billing.services.usage import ChargeRequest, usage_charge
from tests.conftest import assert_ledger_consistent, assert_only_usable_grants_consumed
from tests.factories import make_feature

D = Decimal
THRESHOLD = D("150")

credits_st = st.integers(1, 3000).map(lambda n: D(n) / 100)  # 0.01 .. 30.00
grant_specs = st.fixed_dictionaries({
    "kind": st.sampled_from(["prepaid", "promotional"]),
    "amount": credits_st,
    "priority": st.sampled_from([0, 50, 50, 90]),
    "effective_minutes": st.sampled_from([-120, -5, -5, 0, 0, 0, 30]),
    "lasts_minutes": st.sampled_from([None, None, 30, 90, 600]),
    "price": st.sampled_from([D("0"), D("1"), D("7.5")]),
    "scoped": st.sampled_from([False, False, False, True]),
    "big": st.integers(0, 7),  # 0: above the approval threshold
})


@dataclass
class MGrant:
    pk: int
    kind: str
    original: Decimal
    remaining: Decimal
    priority: int
    effective_at: datetime
    expires_at: datetime | None
    cost_basis: Decimal
    status: str
    scoped: bool

    def usable(self, at, feature_scoped: bool) -> bool:
        return (self.status == "active" and self.remaining > 0 and self.effective_at <= at
                and (self.expires_at is None or self.expires_at > at) and (not self.scoped or feature_scoped))

    def order_key(self):
        return (self.priority, (0, self.expires_at) if self.expires_at else (1, None), self.cost_basis,
                self.effective_at, self.pk)


@dataclass
class MHold:
    pk: int
    amount: Decimal
    expires_at: datetime
    status: str = "open"


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.savepoint = transaction.savepoint()
        self.clock = timezone.now().replace(microsecond=0)
        self.patch = mock.patch("django.utils.timezone.now", lambda: self.clock)
        self.patch.start()
        self.grants: dict[int, MGrant] = {}
        self.holds: dict[int, MHold] = {}
        self.overage = ZERO
        self.events: list[tuple[str, Feature, Decimal, object]] = []
        self.counter = 0

    def teardown(self):
        self.patch.stop()
        transaction.savepoint_rollback(self.savepoint)

    # --- set-up -----------------------------------------------------------------------------------

    @initialize(overdraft=st.booleans(), limit=st.sampled_from([D("0"), D("25"), D("400")]),
                specs=st.lists(grant_specs, max_size=4))
    def open_wallet(self, overdraft, limit, specs):
        self.policy = Wallet.Policy.OVERDRAFT if overdraft else Wallet.Policy.BLOCK
        self.limit = limit if overdraft else ZERO
        customer = customer_create(external_id=f"model-{self.clock.timestamp()}", name="Model",
                                   policy=self.policy, credit_limit=self.limit)
        self.wallet = default_wallet(customer)
        self.api = Feature.objects.get(key="api-call")
        self.images = Feature.objects.get(key="images")
        users = get_user_model().objects  # no password: hashing would dominate the run time
        self.maker = users.create(username="maker", is_staff=True)
        self.checker = users.create(username="checker", is_staff=True)
        self.checker.user_permissions.add(Permission.objects.get(codename="approve_creditgrant"))
        self.checker = type(self.checker).objects.get(pk=self.checker.pk)
        for spec in specs:
            self.grant_one(**spec)

    # --- model helpers ----------------------------------------------------------------------------

    def ledger_balance(self) -> Decimal:
        return sum((g.remaining for g in self.grants.values()), ZERO) - self.overage

    def held(self, *, excluding: int | None = None) -> Decimal:
        return sum((h.amount for h in self.holds.values()
                    if h.status == "open" and h.expires_at > self.clock and h.pk != excluding), ZERO)

    def usable(self, *, scoped_feature: bool) -> list[MGrant]:
        return sorted((g for g in self.grants.values() if g.usable(self.clock, scoped_feature)),
                      key=MGrant.order_key)

    def borrow(self) -> Decimal:
        return max(self.limit - self.overage, ZERO) if self.policy == Wallet.Policy.OVERDRAFT else ZERO

    def available(self, *, scoped_feature: bool = False, excluding_hold: int | None = None) -> Decimal:
        usable = sum((g.remaining for g in self.usable(scoped_feature=scoped_feature)), ZERO)
        return usable - self.held(excluding=excluding_hold) + self.borrow()

    def settle(self, grant: MGrant) -> None:
        if self.overage > 0 and grant.usable(self.clock, feature_scoped=False) and not grant.scoped:
            repay = min(self.overage, grant.remaining)
            grant.remaining -= repay
            self.overage -= repay
            if grant.remaining == 0:
                grant.status = "depleted"

    def expect_charge(self, result, credits: Decimal, *, scoped_feature: bool, hold: MHold | None = None):
        excluding = hold.pk if hold else None
        available = self.available(scoped_feature=scoped_feature, excluding_hold=excluding)
        if credits > available:
            assert result.http_status == 402, result.body
            assert D(result.body["error"]["details"]["available"]) == max(available, ZERO)
            return
        assert result.http_status == 201, result.body
        usable = self.usable(scoped_feature=scoped_feature)
        budget = max(sum((g.remaining for g in usable), ZERO) - self.held(excluding=excluding), ZERO)
        left = min(credits, budget)
        expected = []
        for g in usable:
            if left <= 0:
                break
            take = min(g.remaining, left)
            g.remaining -= take
            left -= take
            if g.remaining == 0:
                g.status = "depleted"
            expected.append((g.pk, take))
        over = credits - sum((t for _, t in expected), ZERO)
        if over > 0:
            expected.append((None, over))
            self.overage += over
        got = [(a["grant"], D(a["amount"])) for a in result.body["allocations"]]
        assert got == expected
        assert D(result.body["balance"]["available"]) == available - credits
        assert D(result.body["balance"]["ledger_balance"]) == self.ledger_balance()
        if hold is not None:
            hold.status = "captured"

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    # --- rules ------------------------------------------------------------------------------------

    @rule(specs=st.lists(grant_specs, min_size=1, max_size=3))
    def grant(self, specs):
        for spec in specs:
            self.grant_one(**spec)

    def grant_one(self, kind, amount, priority, effective_minutes, lasts_minutes, price, scoped, big):
        if big == 0:
            amount += THRESHOLD  # above the threshold: waits for approval
        price = ZERO if kind == "promotional" else price
        effective_at = self.clock + timedelta(minutes=effective_minutes)
        expires_at = effective_at + timedelta(minutes=lasts_minutes) if lasts_minutes else None
        created = grant_create(
            wallet=self.wallet, kind=kind, amount=amount, priority=priority, effective_at=effective_at,
            expires_at=expires_at, price_paid=price, feature=self.images if scoped else None,
            requested_by=self.maker,
        )
        pending = amount > THRESHOLD
        model = MGrant(pk=created.pk, kind=kind, original=amount, remaining=ZERO if pending else amount,
                       priority=priority, effective_at=effective_at, expires_at=expires_at,
                       cost_basis=round_rate(price / amount) if price else ZERO,
                       status="pending_approval" if pending else "active", scoped=scoped)
        self.grants[created.pk] = model
        if not pending:
            self.settle(model)
        assert (created.status, created.remaining) == (model.status, model.remaining)

    @rule(charges=st.lists(st.tuples(st.sampled_from([False, False, True]),
                                     st.integers(1, 4000).map(lambda n: D(n) / 100)), min_size=1, max_size=3),
          replay=st.booleans(), data=st.data(), advance_minutes=st.sampled_from([0, 0, 1, 10, 45, 240]))
    def charge(self, charges, replay, data, advance_minutes):
        """Let time pass (grants expire, holds lapse, grants take effect), then charge."""
        self.clock += timedelta(minutes=advance_minutes)
        for scoped_feature, quantity in charges:
            feature = self.images if scoped_feature else self.api
            event_id = self.next_id("e")
            result = usage_charge(ChargeRequest(customer=self.wallet.customer, wallet_id=self.wallet.pk,
                                                feature=feature, quantity=quantity, event_id=event_id),
                                  now=self.clock)
            credits = round_credits(quantity * (D("0.5") if scoped_feature else D("1")))
            assert result.credits == credits
            self.expect_charge(result, credits, scoped_feature=scoped_feature)
            self.events.append((event_id, feature, quantity, result))
        if replay:  # the same event again, later: the first answer, nothing charged
            event_id, feature, quantity, first = data.draw(st.sampled_from(self.events))
            again = usage_charge(ChargeRequest(customer=self.wallet.customer, wallet_id=self.wallet.pk,
                                               feature=feature, quantity=quantity, event_id=event_id),
                                 now=self.clock)
            assert (again.status, again.http_status, again.body) == ("duplicate", first.http_status, first.body)

    @rule(amount=credits_st, ttl=st.sampled_from([60, 1800, 7200]))
    def hold(self, amount, ttl):
        fits = amount <= self.available()
        try:
            created = reservation_create(customer=self.wallet.customer, wallet_id=self.wallet.pk, amount=amount,
                                         ttl_seconds=ttl, now=self.clock)
        except InsufficientCredits:
            assert not fits
            return
        assert fits
        self.holds[created.pk] = MHold(pk=created.pk, amount=amount, expires_at=self.clock + timedelta(seconds=ttl))

    @precondition(lambda self: any(h.status == "open" for h in self.holds.values()))
    @rule(data=st.data(), capture=st.booleans(), factor=st.sampled_from([D("0"), D("0.5"), D("1"), D("1.5")]))
    def end_hold(self, data, capture, factor):
        hold = self.holds[data.draw(st.sampled_from(sorted(self.holds)))]
        if capture:
            amount = round_credits(max(hold.amount * factor, D("0.01")))
            result = reservation_capture(reservation=Reservation.objects.get(pk=hold.pk),
                                         event_id=self.next_id("cap"), amount=amount, now=self.clock)
            if hold.status != "open" or hold.expires_at <= self.clock:
                assert (result.http_status, result.body["error"]["code"]) == (409, "conflict")
                return
            self.expect_charge(result, amount, scoped_feature=False, hold=hold)
        elif hold.status == "captured":
            with pytest.raises(Conflict):
                reservation_release(reservation_id=hold.pk, now=self.clock)
        else:
            released = reservation_release(reservation_id=hold.pk, now=self.clock)
            if hold.status == "open":
                hold.status = "released" if hold.expires_at > self.clock else "expired"
            assert released.status == hold.status

    @precondition(lambda self: self.grants)
    @rule(data=st.data(), action=st.sampled_from(["void", "approve", "approve", "reject"]))
    def decide(self, data, action):
        """Finance at work: void any grant, or approve / reject a pending one."""
        candidates = sorted(pk for pk, g in self.grants.items()
                            if action == "void" or g.status == "pending_approval")
        if not candidates:
            return
        g = self.grants[data.draw(st.sampled_from(candidates))]
        if action == "void":
            if g.status in ("expired", "rejected"):
                with pytest.raises(Conflict):
                    grant_void(grant_id=g.pk)
                return
            grant_void(grant_id=g.pk)
            g.remaining, g.status = ZERO, "voided"
        elif action == "reject":
            grant_reject(grant_id=g.pk, user=self.checker)
            g.status = "rejected"
        elif g.expires_at is not None and g.expires_at <= self.clock:
            with pytest.raises(Conflict):
                grant_approve(grant_id=g.pk, user=self.checker)
        else:
            grant_approve(grant_id=g.pk, user=self.checker)
            g.status, g.remaining = "active", g.original
            self.settle(g)

    @rule(twice=st.booleans())
    def run_expiry_jobs(self, twice):
        for _ in range(2 if twice else 1):
            grants_expire_due(now=self.clock)
            reservations_expire_due(now=self.clock)
        for g in self.grants.values():
            if g.status == "active" and g.expires_at is not None and g.expires_at <= self.clock:
                g.status, g.remaining = "expired", ZERO
        for h in self.holds.values():
            if h.status == "open" and h.expires_at <= self.clock:
                h.status = "expired"

    # --- invariants -------------------------------------------------------------------------------

    @invariant()
    def matches_the_model(self):
        if not hasattr(self, "wallet"):
            return
        wallet = Wallet.objects.get(pk=self.wallet.pk)
        balance = wallet_balance(wallet, at=self.clock)
        assert wallet.overage == self.overage
        assert wallet.ledger_balance == self.ledger_balance()
        assert balance.available == self.available()
        assert balance.held == self.held()
        stored = {g.pk: (g.status, g.remaining) for g in CreditGrant.objects.filter(wallet=wallet)}
        assert stored == {pk: (g.status, g.remaining) for pk, g in self.grants.items()}
        holds = dict(Reservation.objects.filter(wallet=wallet).values_list("pk", "status"))
        assert holds == {pk: h.status for pk, h in self.holds.items()}
        if self.policy == Wallet.Policy.BLOCK:
            assert balance.available >= 0 or self.held() > 0  # only a void/expiry under a hold can dip
        assert_ledger_consistent(wallet)
        assert_only_usable_grants_consumed(wallet)


@pytest.fixture
def low_approval_threshold(settings):
    settings.CREDITDESK_GRANT_APPROVAL_THRESHOLD = THRESHOLD


@pytest.mark.django_db
def test_ledger_services_match_the_model(low_approval_threshold):
    make_feature("api-call", "1")
    make_feature("images", "0.5")
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=25, stateful_step_count=30, deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            # No shrinking: on a loaded machine it can take minutes; the printed
            # failing sequence is at most 30 steps. Add Phase.shrink to debug locally.
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
        ),
    )
