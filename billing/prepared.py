"""Hot statements as server-side prepared statements on Django's connection.

Django's psycopg backend binds parameters on the client: every execution sends
the statement as text with its values quoted in, and PostgreSQL parses and
plans it again. For the few statements the usage API runs on every request (a
charge, a balance read, resolving a customer) that is most of their cost in the
database and a good part of it in Python. ``fetch`` runs such a statement with
server-side binding, prepared once per connection (psycopg keeps the prepared
statements; PostgreSQL keeps the plan), on the same connection and in the same
transaction as everything else Django does in this thread.

Guarantees: the same rows as ``connection.cursor().execute(sql, params)``;
database errors arrive as Django's exceptions (``django.db.IntegrityError`` …),
so ``transaction.atomic`` and callers see them as usual. Not for a server that
pools connections per transaction (PgBouncer in transaction mode) — prepared
statements need a session; set ``DB_PREPARED_STATEMENTS=0`` there.
"""

from __future__ import annotations

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections


def fetch(sql: str, params, *, all_rows: bool = False):
    """The first row of ``sql`` (or every row, ``all_rows``) with ``params`` (psycopg
    placeholders ``%s`` / ``%(name)s``), prepared on this thread's connection."""
    if not getattr(settings, "DB_PREPARED_STATEMENTS", True):
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if all_rows else cursor.fetchone()
    db = connections[DEFAULT_DB_ALIAS]  # the thread's wrapper, looked up once (each lookup costs)
    if db.connection is None:
        db.ensure_connection()
    db.validate_no_broken_transaction()  # as Django's cursor does, inside an atomic block
    with db.wrap_database_errors:
        cursor = psycopg.Cursor(db.connection)
        try:
            cursor.execute(sql, params, prepare=True)
            return cursor.fetchall() if all_rows else cursor.fetchone()
        finally:
            cursor.close()
