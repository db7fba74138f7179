"""Hot statements as server-side prepared statements on Django's connection.

Django's psycopg backend binds parameters on the client: every execution sends
the statement as text with its values quoted in, and PostgreSQL parses and
plans it again. For the few statements the usage API runs on every request (a
charge, a balance read) that is most of their cost in the database and a good
part of it in Python. ``fetch`` runs such a statement with server-side binding,
prepared once per connection (PostgreSQL keeps the plan), on the same
connection and in the same transaction as everything else Django does in this
thread.

When psycopg would send nothing else first (autocommit, or a transaction
already open), the statement goes straight through libpq (prepare once, then
``PQexecPrepared``) with psycopg's own adapters dumping the parameters and
loading the row: a third of the CPU of a psycopg cursor, and no poll loop
between sending the statement and reading its answer. Otherwise (psycopg has a
``BEGIN`` to send first) a psycopg cursor with ``prepare=True`` runs it.

Guarantees: the same rows as ``connection.cursor().execute(sql, params)``;
database errors arrive as Django's exceptions (``django.db.IntegrityError`` …),
so ``transaction.atomic`` and callers see them as usual; a prepared statement
the server no longer has (``DISCARD ALL``) is prepared again. Not for a pooler
that does not keep a session per client (PgBouncer in transaction mode): set
``DB_PREPARED_STATEMENTS=0`` there.
"""

from __future__ import annotations

import weakref

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections
from psycopg import errors as pg_errors
from psycopg import pq

try:  # psycopg's query converter (pinned psycopg version); without it, the cursor path only
    from psycopg._queries import PostgresQuery
    from psycopg.adapt import Transformer
except ImportError:  # pragma: no cover - another psycopg
    PostgresQuery = None

# psycopg connection -> {(statement bytes, parameter types): prepared statement name}
_names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OK = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)
_IDLE, _INTRANS = pq.TransactionStatus.IDLE, pq.TransactionStatus.INTRANS


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
    raw = db.connection
    with db.wrap_database_errors:
        status = raw.pgconn.transaction_status
        if PostgresQuery is not None and (status == _INTRANS or (status == _IDLE and raw.autocommit)):
            with raw.lock:
                return _fetch_libpq(raw, sql, params, all_rows)
        cursor = psycopg.Cursor(raw)
        try:
            cursor.execute(sql, params, prepare=True)
            return cursor.fetchall() if all_rows else cursor.fetchone()
        finally:
            cursor.close()


def _fetch_libpq(raw: psycopg.Connection, sql: str, params, all_rows: bool):
    transformer = Transformer(raw)
    query = PostgresQuery(transformer)
    query.convert(sql, params)
    names = _names.get(raw)
    if names is None:
        names = _names[raw] = {}
    key = (query.query, query.types)
    pgconn = raw.pgconn
    for attempt in (1, 2):
        name = names.get(key)
        if name is None:
            name = b"creditdesk_%d" % len(names)
            _check(raw, pgconn.prepare(name, query.query, query.types))
            names[key] = name
        result = pgconn.exec_prepared(name, query.params, query.formats, 0)
        if (attempt == 1 and result.status == pq.ExecStatus.FATAL_ERROR
                and result.error_field(pq.DiagnosticField.SQLSTATE) == b"26000"):
            names.clear()  # the session lost its prepared statements (DISCARD ALL): prepare again
            continue
        _check(raw, result)
        break
    transformer.set_pgresult(result)
    if all_rows:
        return transformer.load_rows(0, result.ntuples, tuple)
    return transformer.load_row(0, tuple) if result.ntuples else None


def _check(raw: psycopg.Connection, result) -> None:
    if result.status not in _OK:
        raise pg_errors.error_from_result(result, encoding=raw.info.encoding)
