"""A customer with a pooled wallet, a feature at 1 credit per unit, and helpers
to charge usage and to write contracts on a frozen clock."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
import time_machine

from billing.services.contracts import contract_activate, contract_create
from billing.services.grants import default_wallet
from billing.services.usage import ChargeRequest, usage_charge
from tests.factories import make_customer, make_feature

START = datetime(2026, 1, 1, tzinfo=UTC)


def at(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def feature(db):
    return make_feature("api-call", "1", effective_from=at(2025, 1, 1))


@pytest.fixture
def customer(db):
    return make_customer("bigco", name="BigCo", email="ap@bigco.test")


@pytest.fixture
def wallet(customer):
    return default_wallet(customer)


def charge(wallet, feature, quantity, event_id: str, team: str = "research"):
    result = usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                        quantity=Decimal(str(quantity)), event_id=event_id,
                                        properties={"team": team}))
    assert result.status == "charged", result
    return result


def tiered_contract(customer, **overrides):
    """200,000 credits a year; list 0.01, tier 0.009 from 100,000 (0.008 from
    500,000), 10 % off: 0.0081 per credit; quarterly instalments of 50,000."""
    terms = {
        "customer": customer, "starts_at": START, "list_price": Decimal("0.01"),
        "committed_credits": Decimal("200000"),
        "tiers": [(Decimal("100000"), Decimal("0.009")), (Decimal("500000"), Decimal("0.008"))],
        "discount_percent": Decimal("10"), "reference": "BIG-2026",
    }
    terms.update(overrides)
    return contract_create(**terms)


def active_contract(customer, **overrides):
    """``tiered_contract`` activated at ``START`` (its first instalment released)."""
    contract = tiered_contract(customer, **overrides)
    with time_machine.travel(START, tick=False):
        return contract_activate(contract_id=contract.pk)
