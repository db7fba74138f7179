from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.selectors import rate_card_impact
from billing.services.usage import ChargeRequest, usage_charge
from tests.factories import funded_wallet, make_feature


@pytest.mark.django_db
def test_replay_reprices_each_event_and_changes_nothing():
    tokens = make_feature("tokens", "0.5")
    images = make_feature("images", "10")
    heavy = funded_wallet("1000")
    light = funded_wallet("1000")
    for n, (wallet, feature, qty) in enumerate(
        [(heavy, tokens, "3"), (heavy, tokens, "3"), (heavy, images, "1"), (light, tokens, "1")]
    ):
        usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                   quantity=Decimal(qty), event_id=f"e{n}"))
    heavy.refresh_from_db()
    before = heavy.ledger_balance

    now = timezone.now()
    rows = rate_card_impact(proposed={tokens.pk: Decimal("0.3333333")}, start=now - timedelta(hours=1),
                            end=now + timedelta(hours=1))

    by_customer = {row.customer_id: row for row in rows}
    # 3 × 0.3333333 = 0.9999999 → 1.000000 per event, rounded on its own; images unchanged.
    assert by_customer[heavy.customer_id].current_credits == Decimal("13")
    assert by_customer[heavy.customer_id].proposed_credits == Decimal("12")
    assert by_customer[light.customer_id].proposed_credits == Decimal("0.333333")
    assert rows[0].customer_id == light.customer_id  # smallest decrease first
    heavy.refresh_from_db()
    assert heavy.ledger_balance == before
