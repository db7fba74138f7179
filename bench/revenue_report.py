"""How long the revenue report, a grant's revenue schedule and the nightly
revenue check take on a 2-million-entry ledger.

    .venv/bin/python bench/revenue_report.py [--customers 2000] [--grants 5] [--entries 200]

Resets the database ``creditdesk_revenue_bench`` on the project's PostgreSQL
server (the embedded one unless ``DATABASE_URL`` is set), migrates it, creates
customers × grants paid grants through ``grant_create`` a year ago, then
appends ``entries`` usage entries per grant, spread over the year, in one SQL
statement (grants' remaining and wallets' balances and sequences moved to
match, so the books stay whole). Prints the timings (best of 3).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import server_url, with_database  # noqa: E402

# Its own database: never bench/run.py's.
BENCH_DB = "creditdesk_revenue_bench"


def reset_database(base_url: str) -> str:
    import psycopg

    with psycopg.connect(with_database(base_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
    return with_database(base_url, BENCH_DB)


def seed(customers: int, grants: int, entries: int) -> None:
    from datetime import timedelta
    from decimal import Decimal

    import time_machine
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from billing.services.grants import customer_create, default_wallet, grant_create

    call_command("migrate", verbosity=0, interactive=False)
    year_ago = timezone.now() - timedelta(days=370)
    with time_machine.travel(year_ago, tick=False):
        for i in range(customers):
            wallet = default_wallet(customer_create(external_id=f"rev-{i:05d}", name=f"Revenue bench {i:05d}"))
            for j in range(grants):
                grant_create(wallet=wallet, kind="prepaid", amount=Decimal(entries * 5),
                             price_paid=Decimal(entries * 5) / Decimal("7"), require_approval=False,
                             idempotency_key=f"bench-{j}")
    with connection.cursor() as cursor:
        cursor.execute(
            """INSERT INTO billing_ledgerentry (wallet_id, grant_id, type, amount, sequence, balance_after,
                                                reference, idempotency_key, memo, created_at)
               SELECT g.wallet_id, g.id, 'usage', -1,
                      w.last_sequence + row_number() OVER (PARTITION BY g.wallet_id ORDER BY g.id, s),
                      w.ledger_balance - row_number() OVER (PARTITION BY g.wallet_id ORDER BY g.id, s),
                      '', '', '', %s + s * (interval '360 days' / %s) + g.id * interval '1 second'
                 FROM billing_creditgrant g JOIN billing_wallet w ON w.id = g.wallet_id,
                      generate_series(1, %s) s""",
            [year_ago, entries, entries],
        )
        cursor.execute("UPDATE billing_creditgrant SET remaining = remaining - %s", [entries])
        cursor.execute(
            """UPDATE billing_wallet w SET ledger_balance = w.ledger_balance - c.n,
                      last_sequence = w.last_sequence + c.n
                 FROM (SELECT wallet_id, count(*) * %s AS n FROM billing_creditgrant GROUP BY wallet_id) c
                WHERE c.wallet_id = w.id""",
            [entries],
        )
        cursor.execute("ANALYZE")


def best_of(runs: int, call) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--grants", type=int, default=5)
    parser.add_argument("--entries", type=int, default=200)
    args = parser.parse_args()
    url = reset_database(server_url())
    assert url.split("?")[0].endswith(f"/{BENCH_DB}"), url
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.utils import timezone

    from billing.models import CreditGrant, LedgerEntry
    from billing.services.revenue import grant_schedule, month_of, revenue_check, revenue_report

    started = time.perf_counter()
    seed(args.customers, args.grants, args.entries)
    print(f"seeded {LedgerEntry.objects.count():,} ledger entries on {CreditGrant.objects.count():,} paid grants "
          f"in {time.perf_counter() - started:.0f} s")
    year, month = month_of(timezone.now() - timezone.timedelta(days=60))
    report = revenue_report(year=year, month=month, currency="USD")
    assert report.reconciles, [c for c in report.checks if not c.ok]
    print(f"monthly report {year}-{month:02d}: {best_of(3, lambda: revenue_report(year=year, month=month)):.2f} s "
          f"(usage {report.usage}, deferred at month end {report.closing_deferred}, reconciles)")
    grant = CreditGrant.objects.order_by("pk").first()
    print(f"one grant's schedule (13 months): {best_of(3, lambda: grant_schedule(grant)) * 1000:.0f} ms")
    result = None

    def check():
        nonlocal result
        result = revenue_check()

    print(f"nightly check (every paid grant + 2 reports): {best_of(1, check):.1f} s, "
          f"{len(result.mismatches)} differences")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
