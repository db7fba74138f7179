"""Service-level profile of the charge hot path, without HTTP.

    .venv/bin/python bench/profile_charge.py [--events 2000] [--cprofile]

Uses the database ``creditdesk_bench`` left by ``bench/run.py`` (run that
first). Prints the SQL statements of one single-event charge and of one
1,000-event batch, and the wall time per charge in one process.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()

    from bench.run import BENCH_DB, FEATURE_KEY, server_url, setup_django, with_database

    setup_django(with_database(server_url(), BENCH_DB))
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from billing.models import Customer, Feature
    from billing.services.grants import default_wallet
    from billing.services.usage import ChargeRequest, usage_charge, usage_charge_many

    feature = Feature.objects.get(key=FEATURE_KEY)
    customers = list(Customer.objects.filter(external_id__startswith="bench-0").order_by("pk")[:1000])
    wallets = {c.pk: default_wallet(c).pk for c in customers}
    stamp = time.strftime("%H%M%S")

    def request(i: int, customer=None) -> ChargeRequest:
        customer = customer or customers[i % len(customers)]
        return ChargeRequest(customer=customer, wallet_id=wallets[customer.pk], feature=feature,
                             quantity=Decimal(1), event_id=f"profile-{stamp}-{i}")

    with CaptureQueriesContext(connection) as queries:
        result = usage_charge(request(0))
    print(f"single charge -> {result.http_status}: {len(queries)} statements")
    for q in queries.captured_queries:
        print(f"  {q['time']}s  {q['sql'][:160]}")

    batch = [request(10_000_000 + i, customers[(i // 100) % 10]) for i in range(1000)]
    with CaptureQueriesContext(connection) as queries:
        t0 = time.perf_counter()
        usage_charge_many(batch)
        batch_time = time.perf_counter() - t0
    print(f"batch of 1,000 (10 wallets): {len(queries)} statements, {batch_time * 1000:.0f} ms")
    for q in queries.captured_queries:
        print(f"  {q['time']}s  {q['sql'][:100]}")

    profiler = cProfile.Profile() if args.cprofile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    for i in range(1, args.events + 1):
        usage_charge(request(i))
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - t0
    print(f"{args.events} single charges in one process: {elapsed / args.events * 1000:.2f} ms each "
          f"({args.events / elapsed:,.0f}/s)")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    main()
