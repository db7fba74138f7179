from decimal import Decimal

import pytest
from django.db import DatabaseError, connection, transaction

from billing.models import LedgerEntry
from billing.services.grants import default_wallet
from billing.services.usage import ChargeRequest, usage_charge
from tests.factories import funded_wallet, grant


def charge(wallet, feature, quantity, event_id):
    return usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                      quantity=Decimal(quantity), event_id=event_id))


@pytest.mark.django_db
def test_charge_spans_grants_in_consumption_order(feature, ledger_consistent):
    wallet = funded_wallet("10")
    promo = grant(wallet, "5", kind="promotional")
    result = charge(wallet, feature, "12", "e1")
    assert result.http_status == 201
    allocations = result.body["allocations"]
    assert allocations[0] == {"grant": promo.pk, "amount": "5.000000"}
    assert allocations[1]["amount"] == "7.000000"
    assert result.body["balance"] == {"available": "3.000000", "ledger_balance": "3.000000"}
    ledger_consistent(wallet)


@pytest.mark.django_db
def test_insufficient_block_wallet_charges_nothing_and_replays(feature, ledger_consistent):
    wallet = funded_wallet("3")
    first = charge(wallet, feature, "5", "big")
    assert first.http_status == 402
    assert first.body["error"]["details"] == {"required": "5.000000", "available": "3.000000", "event_id": "big"}
    again = charge(wallet, feature, "5", "big")
    assert (again.http_status, again.body) == (402, first.body)
    conflict = charge(wallet, feature, "1", "big")
    assert conflict.http_status == 409
    ledger_consistent(wallet)


@pytest.mark.django_db
def test_overdraft_runs_into_overage_and_next_grant_repays(feature, ledger_consistent):
    wallet = funded_wallet("2", policy="overdraft", credit_limit="10")
    assert charge(wallet, feature, "5", "o1").http_status == 201
    wallet.refresh_from_db()
    assert wallet.overage == Decimal("3")
    ledger_consistent(wallet)
    grant(wallet, "10")
    wallet.refresh_from_db()
    assert wallet.overage == 0 and wallet.ledger_balance == Decimal("7")
    ledger_consistent(wallet)


@pytest.mark.django_db
def test_ledger_rows_refused_by_database(feature):
    wallet = funded_wallet("5")
    entry = LedgerEntry.objects.filter(wallet=wallet).first()
    for sql in ("UPDATE billing_ledgerentry SET amount = 0 WHERE id = %s", "DELETE FROM billing_ledgerentry WHERE id = %s"):
        with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, [entry.pk])
    assert default_wallet(wallet.customer).ledger_balance == Decimal("5")
