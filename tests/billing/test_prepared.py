"""``billing.prepared.fetch``: the same rows as Django's cursor, Django's exceptions, the
statement inside the caller's transaction, prepared statements re-made after DISCARD ALL
— in autocommit (the API's case), inside an atomic block, and at its first statement."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction

from billing import prepared
from billing.models import Customer

SQL = ("SELECT %(n)s::numeric * 2, %(at)s::timestamptz, %(ids)s::bigint[], %(text)s::text, NULL::text,"
       " ARRAY[%(n)s::numeric]")
PARAMS = {"n": Decimal("1.000001"), "at": datetime(2026, 11, 30, 12, 0, tzinfo=UTC), "ids": [1, 2, 3],
          "text": "é ✓"}


def via_django(sql, params):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


@pytest.mark.django_db(transaction=True)
def test_autocommit_rows_errors_and_discard_all():
    assert connection.get_autocommit()
    expected = via_django(SQL, PARAMS)
    for _ in range(3):  # prepared once, executed again
        assert prepared.fetch(SQL, PARAMS) == expected[0]
        assert prepared.fetch(SQL, PARAMS, all_rows=True) == expected
    assert prepared._names[connection.connection], "autocommit goes straight through libpq"
    assert prepared.fetch("SELECT 1 WHERE false", ()) is None
    assert prepared.fetch("SELECT 1 WHERE false", (), all_rows=True) == []

    Customer.objects.create(external_id="dup", name="Dup")
    insert = "INSERT INTO billing_customer (external_id, name, email, currency, timezone, created_at, metadata) " \
             "SELECT %s, 'x', '', 'USD', 'UTC', now(), '{}' RETURNING id"
    with pytest.raises(IntegrityError):
        prepared.fetch(insert, ("dup",))
    assert prepared.fetch(insert, ("fresh",))[0] > 0  # autocommit: committed on its own
    assert Customer.objects.filter(external_id="fresh").exists()

    with connection.cursor() as cursor:
        cursor.execute("DISCARD ALL")
    assert prepared.fetch(SQL, PARAMS) == expected[0]


@pytest.mark.django_db(transaction=True)
def test_inside_atomic_the_statement_is_part_of_the_transaction():
    insert = "INSERT INTO billing_customer (external_id, name, email, currency, timezone, created_at, metadata) " \
             "SELECT %s, 'x', '', 'USD', 'UTC', now(), '{}' RETURNING id"
    with pytest.raises(RuntimeError), transaction.atomic():
        prepared.fetch(insert, ("first-statement",))  # the transaction's first statement: BEGIN first
        prepared.fetch(insert, ("second-statement",))
        raise RuntimeError("roll back")
    assert not Customer.objects.filter(external_id__in=["first-statement", "second-statement"]).exists()
    with transaction.atomic():
        Customer.objects.create(external_id="orm-first", name="x")
        prepared.fetch(insert, ("then-prepared",))
    assert Customer.objects.filter(external_id__in=["orm-first", "then-prepared"]).count() == 2


@pytest.mark.django_db
def test_switched_off_it_is_django_s_cursor(settings):
    settings.DB_PREPARED_STATEMENTS = False
    assert prepared.fetch(SQL, PARAMS) == via_django(SQL, PARAMS)[0]
