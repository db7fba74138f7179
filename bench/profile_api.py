"""In-process profile of the hot API endpoints: the WSGI application called directly.

    .venv/bin/python bench/profile_api.py [--requests 2000] [--only usage balance batch] [--cprofile]

Uses the database ``creditdesk_bench`` (or ``CREDITDESK_BENCH_DB``) left by
``bench/run.py`` (run that first). Builds the WSGI environ a server would and calls ``config.wsgi``'s
application in a loop, so the figure is Django + the view + the database,
without gunicorn's HTTP parsing. Prints wall and CPU time per request.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def environ(method: str, path: str, token: str, body: dict | None = None) -> dict:
    payload = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
    env = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1",
        "HTTP_AUTHORIZATION": f"Bearer {token}", "HTTP_CONNECTION": "keep-alive", "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(payload), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
        "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.version": (1, 0), "SCRIPT_NAME": "",
        "REMOTE_ADDR": "127.0.0.1",
    }
    if body is not None:
        env["CONTENT_TYPE"] = "application/json"
        env["CONTENT_LENGTH"] = str(len(payload))
    return env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--only", nargs="*", default=["usage", "balance", "batch"])
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative)")
    parser.add_argument("--django", action="store_true",
                        help="call Django's own WSGI application (URL resolving, middleware) instead of config.wsgi's "
                             "hot-route dispatcher, for comparison")
    args = parser.parse_args()

    from bench.run import BENCH_DB, FEATURE_KEY, HOT_CUSTOMER, SPREAD_WALLETS, server_url, with_database

    os.environ["DATABASE_URL"] = with_database(server_url(), BENCH_DB)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("DB_CONN_MAX_AGE", "600")
    wsgi = importlib.import_module("config.wsgi")  # sets Django up first
    application = wsgi.django_application if args.django else wsgi.application
    from billing.services.api_keys import api_key_create

    _, token = api_key_create(name="profile", scopes=["usage:write", "balance:read"])
    stamp = time.strftime("%H%M%S")
    statuses: dict[int, int] = {}

    def start_response(status, headers, exc_info=None):
        code = int(status.split()[0])
        statuses[code] = statuses.get(code, 0) + 1

    def call(env: dict) -> bytes:
        chunks = application(env, start_response)
        try:
            return b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()

    makers = {
        "usage": lambda i: environ("POST", "/api/v1/usage", token, {
            "customer": f"bench-{i % SPREAD_WALLETS:04d}", "feature": FEATURE_KEY, "quantity": "1",
            "event_id": f"prof-{stamp}-{i}"}),
        "hot": lambda i: environ("POST", "/api/v1/usage", token, {
            "customer": HOT_CUSTOMER, "feature": FEATURE_KEY, "quantity": "1", "event_id": f"profh-{stamp}-{i}"}),
        "balance": lambda i: environ("GET", f"/api/v1/customers/bench-{i % SPREAD_WALLETS:04d}/balance", token),
        "batch": lambda i: environ("POST", "/api/v1/usage/batch", token, {"events": [
            {"customer": f"bench-{(i % 100) * 10 + j // 100:04d}", "feature": FEATURE_KEY, "quantity": "1",
             "event_id": f"profb-{stamp}-{i}-{j}"} for j in range(1000)]}),
    }
    for name in args.only:
        count = args.requests if name != "batch" else max(5, args.requests // 200)
        envs = [makers[name](i) for i in range(count + 20)]
        for env in envs[:20]:
            call(env)
        print(f"{name}: sample answer {call(makers[name](10**6))[:200]!r}")
        statuses.clear()
        profiler = cProfile.Profile(time.process_time) if args.cprofile else None  # CPU time, not waits
        wall0, cpu0 = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        for env in envs[20:]:
            call(env)
        if profiler:
            profiler.disable()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        print(f"{name}: {count} requests, {wall / count * 1000:.3f} ms wall, {cpu / count * 1000:.3f} ms CPU "
              f"each; statuses {statuses}", flush=True)
        if profiler:
            pstats.Stats(profiler).sort_stats(args.sort).print_stats(30)


if __name__ == "__main__":
    main()
