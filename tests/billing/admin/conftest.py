"""Staff users per role (groups from billing.roles) and a small book of business
that gives every billing admin page something to show."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model

from billing import roles
from billing.models import (
    AuditEvent,
    FeatureCost,
    IdempotencyRecord,
    JobRun,
    OutboxEvent,
    PackDiscountTier,
)
from billing.services.api_keys import api_key_create
from billing.services.grants import adjustment_request, default_wallet, grant_create
from billing.services.packs import pack_purchase
from billing.services.reservations import reservation_create
from billing.services.team_limits import team_limit_set
from billing.services.usage import ChargeRequest, usage_charge
from tests.factories import CreditPackFactory, UserFactory, make_customer, make_feature

ROLE_NAMES = {
    "finance": roles.FINANCE,
    "sales_rep": roles.SALES_REP,
    "sales_manager": roles.SALES_MANAGER,
    "support": roles.SUPPORT,
    "auditor": roles.AUDITOR,
}


@pytest.fixture
def role_groups(db):
    return roles.ensure_roles()


@pytest.fixture
def make_staff(role_groups):
    def make(role: str, username: str | None = None):
        username = username or f"{role}-user"
        if role == "superuser":
            return get_user_model().objects.create_superuser(username, f"{username}@example.com", "pw-for-tests-1")
        user = UserFactory(username=username)
        user.groups.add(role_groups[ROLE_NAMES[role]])
        return get_user_model().objects.get(pk=user.pk)  # fresh permission cache

    return make


@pytest.fixture
def staff_client(client, make_staff):
    """``staff_client(role)`` → a client logged in as a fresh user with that role."""

    def login(role: str, username: str | None = None):
        user = make_staff(role, username)
        client.force_login(user)
        client.user = user
        return client

    return login


def charge(wallet, feature, quantity, event_id):
    return usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                      quantity=Decimal(quantity), event_id=event_id))


@pytest.fixture
def book(db, make_staff):
    """One of every billing row, written through the services where they exist."""
    requester = make_staff("finance", "requester")
    feature = make_feature("api-call", "2")
    customer = make_customer("acme", name="Acme Inc", email="ops@acme.test")
    wallet = default_wallet(customer)
    grant = grant_create(wallet=wallet, kind="prepaid", amount=Decimal("1000"), price_paid=Decimal("100"),
                         reason="first purchase", require_approval=False)
    pending = grant_create(wallet=wallet, kind="promotional", amount=Decimal("70000"), reason="big promo",
                           requested_by=requester)
    assert pending.status == "pending_approval"
    charge(wallet, feature, "3", "evt-1")
    hold = reservation_create(customer=customer, wallet_id=wallet.pk, amount=Decimal("5"))
    pack = CreditPackFactory(code="starter", name="Starter")
    PackDiscountTier.objects.create(pack=pack, min_quantity=5, discount_percent=Decimal("10"))
    purchase = pack_purchase(wallet=wallet, pack=pack, quantity=1, purchased_by=requester)
    adjustment = adjustment_request(wallet=wallet, amount=Decimal("-1"), reason="typo", requested_by=requester)
    api_key, _ = api_key_create(name="backend", scopes=["usage:write"], created_by=requester)
    team_limit = team_limit_set(wallet_id=wallet.pk, team="research", monthly_limit=Decimal("500"))
    return {
        "customer": customer, "wallet": wallet, "creditgrant": grant, "pending": pending, "feature": feature,
        "featurecost": FeatureCost.objects.filter(feature=feature).first(), "reservation": hold,
        "creditpack": pack, "packdiscounttier": pack.tiers.first(), "packpurchase": purchase,
        "adjustment": adjustment, "apikey": api_key, "ledgerentry": wallet.entries.first(),
        "usageevent": customer.usage_events.first(), "auditevent": AuditEvent.objects.first(),
        "outboxevent": OutboxEvent.objects.first() or OutboxEvent.objects.create(topic="test.event"),
        "jobrun": JobRun.objects.create(name="grants_expire_due", total=3, done=3, status="done"),
        "idempotencyrecord": IdempotencyRecord.objects.create(scope="grants.create:acme", key="k1",
                                                              request_hash="x", status_code=201, response={}),
        "teamspendinglimit": team_limit, "teamspend": team_limit.spends.get(), "requester": requester,
    }
