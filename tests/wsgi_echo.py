"""A tiny WSGI application (no Django, no database) for tests/test_gunicorn_worker.py.

Paths under ``/q/`` are quick (``is_quick``: served inline on the worker's loop), every other
path goes to the worker's thread pool; both answer the same routes (the prefix is dropped):

    /echo[/...]      JSON: method, body, the thread that answered and the environ's CGI keys
    /slow?s=<sec>    sleeps, then answers "slept"
    /status/<code>   answers that status with a body (which 204/304/HEAD must not carry)
    /gen             a generator body without Content-Length
    /raise           raises before start_response; /raise-late raises while iterating
    /bad-header      a header value with CR LF (response splitting), which the server must refuse
    /closes          how many response iterables the server has closed in this process
    /pid             the worker's process id
"""

from __future__ import annotations

import json
import os
import threading
import time

CLOSED = {"count": 0}
_lock = threading.Lock()


class Body:
    """A response iterable that counts its ``close()`` calls (PEP 3333: the server must call it)."""

    def __init__(self, chunks, fail: bool = False):
        self.chunks, self.fail = chunks, fail

    def __iter__(self):
        yield from self.chunks
        if self.fail:
            raise RuntimeError("failed while iterating")

    def close(self):
        with _lock:
            CLOSED["count"] += 1


def is_quick(environ: dict) -> bool:
    """Requests under /q/ are answered on the loop thread."""
    return environ["PATH_INFO"].startswith("/q/")


def application(environ: dict, start_response):
    path = environ["PATH_INFO"]
    if path.startswith("/q/"):
        path = path[2:]
    if path == "/raise":
        raise RuntimeError("the application failed")
    if path == "/echo" or path.startswith("/echo/"):
        body = environ["wsgi.input"].read()
        cgi = {key: value for key, value in environ.items() if isinstance(value, str)}
        answer = json.dumps({"method": environ["REQUEST_METHOD"], "body": body.decode("latin-1"),
                             "thread": threading.current_thread().name, "environ": cgi}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
        return Body([answer])
    if path == "/slow":
        time.sleep(float(environ["QUERY_STRING"].partition("=")[2] or 1))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return Body([b"slept"])
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        start_response(f"{code} Whatever", [("Content-Type", "text/plain")])
        return Body([b"this body must not be sent"])
    if path == "/gen":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (chunk for chunk in (b"one,", b"", b"two,", b"three"))
    if path == "/raise-late":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body([b"partial"], fail=True)
    if path == "/bad-header":
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Injected", "a\r\nSet-Cookie: evil=1")])
        return Body([b"never"])
    if path == "/closes":
        answer = str(CLOSED["count"]).encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [answer]
    if path == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return Body([b"not found"])


application.is_quick = is_quick
