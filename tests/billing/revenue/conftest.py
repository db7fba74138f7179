"""Customers with paid packs, staff with the refund roles, and a charge helper."""

from __future__ import annotations

from decimal import Decimal
from itertools import count

import pytest
from django.contrib.auth import get_user_model

from billing import roles
from billing.services.grants import default_wallet
from billing.services.packs import pack_purchase
from billing.services.usage import ChargeRequest, usage_charge
from tests.factories import CreditPackFactory, UserFactory, make_customer, make_feature

_events = count(1)


@pytest.fixture
def role_groups(db):
    return roles.ensure_roles()


@pytest.fixture
def make_staff(role_groups):
    def make(role: str, username: str):
        user = UserFactory(username=username)
        user.groups.add(role_groups[role])
        return get_user_model().objects.get(pk=user.pk)

    return make


@pytest.fixture
def finance(make_staff):
    return make_staff(roles.FINANCE, "fin-one")


@pytest.fixture
def finance2(make_staff):
    return make_staff(roles.FINANCE, "fin-two")


@pytest.fixture
def support(make_staff):
    return make_staff(roles.SUPPORT, "support-one")


@pytest.fixture
def api_feature(db):
    return make_feature("api-call", "1")


@pytest.fixture
def pack(db):
    """1,000 credits for 100.00 USD: 0.10 per credit."""
    return CreditPackFactory(code="starter", name="Starter", credits=Decimal("1000"), price=Decimal("100.00"))


@pytest.fixture
def bought(pack):
    """A customer who bought one pack: (wallet, purchase)."""
    customer = make_customer("buyer")
    wallet = default_wallet(customer)
    return wallet, pack_purchase(wallet=wallet, pack=pack)


def charge(wallet, feature, quantity) -> None:
    result = usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                        quantity=Decimal(str(quantity)), event_id=f"rev-{next(_events)}"))
    assert result.status == "charged", result
