"""A gunicorn worker for Creditdesk: one event loop per process, quick requests served inline.

    gunicorn config.wsgi:application -k config.gunicorn_worker.LoopWorker -w 4 --threads 4

Why: the usage API's hot requests (a charge, a batch, a balance read) are one
database statement each, so most of a request's cost is the HTTP server and
Python around it. gunicorn's ``gthread`` worker parses HTTP in Python and hands
every request from its poller thread to a pool thread and back, with 16+ threads
of one process taking turns on the GIL. This worker parses with ``httptools``
(llhttp, the C parser of Node.js) in the one loop thread and runs a request the
application calls quick (``application.is_quick(environ)``: the hot routes'
ordinary requests, see ``billing/api/fast.py``) right there, start to finish,
with no thread switch. Every other request (the admin, reports, documents) goes
to a pool of ``--threads`` threads, as with ``gthread``, so a slow page never
holds up the loop; its answer comes back to the loop to be written.

What it guarantees, as a gunicorn worker:
- HTTP/1.0 and 1.1 with keep-alive (``--keep-alive`` seconds idle), pipelining
  (answers in request order), ``Expect: 100-continue``, chunked request bodies;
  a request line, header or body over gunicorn's ``--limit-request-*`` settings or
  ``MAX_BODY`` gets a 4xx and the connection closed; a malformed request a 400.
- Responses carry ``Content-Length`` (a body without one is buffered and
  measured), ``Date`` and ``Connection: close`` when the connection ends; HEAD,
  1xx, 204 and 304 answers carry no body.
- The WSGI iterable is always closed (Django's ``request_finished``: database
  connections are returned); an application error becomes a plain 500.
- Heartbeat to the arbiter at least every second, ``--max-requests``,
  ``--worker-connections``, graceful stop on SIGTERM (in-flight requests finish
  within ``--graceful-timeout``), gunicorn's access log.
Not supported: TLS (terminate it in front), HTTP/2, WebSocket upgrades (answered 501).
"""

from __future__ import annotations

import errno
import io
import os
import queue
import selectors
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from email.utils import formatdate
from urllib.parse import unquote_to_bytes

import httptools
from gunicorn.workers import base

# The largest request body read into memory (bigger: 413). Django applies its own,
# smaller limits (DATA_UPLOAD_MAX_MEMORY_SIZE) to what it parses.
MAX_BODY = 32 * 1024 * 1024
RECV_SIZE = 256 * 1024
_REASONS = {400: "Bad Request", 414: "Request-URI Too Long", 413: "Request Entity Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented"}
_NO_BODY = frozenset((204, 304))


class RequestRefused(Exception):
    """A request this server answers itself with ``status`` and closes the connection after."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Request:
    __slots__ = ("method", "url", "headers", "body", "keep_alive", "version", "upgrade", "received")

    def __init__(self):
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.upgrade = False


class Connection:
    """One client socket: its parser, the requests parsed and not yet answered, the bytes
    still to send. Only the loop thread touches it, except ``busy`` requests' environ."""

    def __init__(self, worker: LoopWorker, sock: socket.socket, client):
        self.worker, self.sock, self.client = worker, sock, client
        self.parser = httptools.HttpRequestParser(self)
        self.current: _Request | None = None
        self.header_bytes = 0
        self.body_bytes = 0
        self.pending: list[_Request] = []
        self.out = bytearray()
        self.busy = False  # a request of this connection is in the thread pool
        self.closing = False  # close once ``out`` is sent
        self.eof = False  # the client will send nothing more
        self.last_active = time.monotonic()
        self.watching = 0

    # --- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self):
        self.current = _Request()
        self.current.received = time.monotonic()
        self.header_bytes = 0
        self.body_bytes = 0

    def on_url(self, url: bytes):
        cfg = self.worker.cfg
        self.current.url += url  # the parser may hand the URL over in pieces
        if cfg.limit_request_line and len(self.current.url) > cfg.limit_request_line:
            raise RequestRefused(414, "Request-URI Too Long")

    def on_header(self, name: bytes, value: bytes):
        cfg = self.worker.cfg
        self.header_bytes += len(name) + len(value)
        headers = self.current.headers
        if cfg.limit_request_fields and len(headers) >= cfg.limit_request_fields:
            raise RequestRefused(431, "Too many header fields")
        if cfg.limit_request_field_size and len(name) + len(value) > cfg.limit_request_field_size:
            raise RequestRefused(431, "Header field too large")
        headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self):
        request, parser = self.current, self.parser
        request.method = parser.get_method().decode("ascii")
        request.version = parser.get_http_version()
        request.upgrade = parser.should_upgrade()
        for name, value in request.headers:
            if len(name) == 6 and name.lower() == "expect" and value.lower() == "100-continue":
                if request.version == "1.1":
                    self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes):
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY:
            raise RequestRefused(413, "Request body too large")
        self.current.body.append(body)

    def on_message_complete(self):
        request = self.current
        request.keep_alive = self.parser.should_keep_alive()
        self.current = None
        self.pending.append(request)

    # --- I/O ------------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue ``data`` and write what the socket takes now; the loop writes the rest."""
        self.out += data
        self.flush()

    def flush(self) -> None:
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.out.clear()
                self.closing = self.eof = True
                sent = 0
            if sent:
                del self.out[:sent]
        self.worker.watch(self)


class _AccessResponse:
    """What gunicorn's access log reads from a response."""

    __slots__ = ("status", "headers", "sent")

    def __init__(self, status: str, headers: list, sent: int):
        self.status, self.headers, self.sent = status, headers, sent


class LoopWorker(base.Worker):
    """See the module docstring."""

    def init_process(self):
        self.selector = selectors.DefaultSelector()
        self.pool = ThreadPoolExecutor(max(1, self.cfg.threads), thread_name_prefix="creditdesk-web")
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)
        self.connections: dict[int, Connection] = {}
        self.in_pool = 0
        self._date = (0, b"")
        super().init_process()

    # --- the loop -----------------------------------------------------------------------------
    def run(self):
        for listener in self.sockets:
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ, "accept")
        os.set_blocking(self.PIPE[0], False)
        self.selector.register(self.PIPE[0], selectors.EVENT_READ, "signal")
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "finished")
        self.quick = getattr(self.wsgi, "is_quick", None)
        address = self.sockets[0].getsockname() if self.sockets else None
        self.server_address = (str(address[0]), str(address[1])) if isinstance(address, tuple) else ("", "")
        last_sweep = time.monotonic()
        while self.alive:
            self.notify()
            for key, events in self.selector.select(timeout=1.0):
                data = key.data
                if data == "accept":
                    self.accept(key.fileobj)
                elif data == "signal":
                    self._drain(self.PIPE[0])
                elif data == "finished":
                    self._drain(self.wakeup_r)
                else:
                    if events & selectors.EVENT_WRITE:
                        data.flush()
                    if events & selectors.EVENT_READ:
                        self.readable(data)
                    self.advance(data)
            self.collect_finished()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                break
            now = time.monotonic()
            if now - last_sweep >= 1.0:
                last_sweep = now
                self.close_idle(now)
        self.stop_gracefully()

    def _drain(self, fd) -> None:
        try:
            while (os.read(fd, 4096) if isinstance(fd, int) else fd.recv(4096)):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def accept(self, listener) -> None:
        for _ in range(64):
            if len(self.connections) >= self.cfg.worker_connections:
                return
            try:
                sock, client = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EMFILE, errno.ENFILE):
                    raise
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self, sock, client)
            self.connections[sock.fileno()] = conn
            self.watch(conn)

    def watch(self, conn: Connection) -> None:
        """Register the connection for what it waits on: writing while bytes are left to
        send, reading while it can still take a request (not while one is in the pool)."""
        if conn.sock.fileno() < 0:
            return
        wanted = 0
        if conn.out:
            wanted |= selectors.EVENT_WRITE
        if not conn.eof and not conn.closing:
            wanted |= selectors.EVENT_READ
        if wanted != conn.watching:
            if conn.watching and wanted:
                self.selector.modify(conn.sock, wanted, conn)
            elif wanted:
                self.selector.register(conn.sock, wanted, conn)
            else:
                self.selector.unregister(conn.sock)
            conn.watching = wanted

    def readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.last_active = time.monotonic()
        if not data:
            conn.eof = True
            self.watch(conn)
            return
        try:
            conn.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.refuse(conn, 501)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            self.refuse(conn, refused.status if isinstance(refused, RequestRefused) else 400)
        except httptools.HttpParserError:
            self.refuse(conn, 400)

    def refuse(self, conn: Connection, status: int) -> None:
        """Answer a request this server will not pass on, after those before it, and close."""
        conn.pending.append(_refusal(status))
        conn.eof = True
        self.watch(conn)

    def advance(self, conn: Connection) -> None:
        """Answer the connection's next parsed request unless one is in flight; close it when done."""
        while not conn.busy and conn.pending and not conn.closing and not conn.out:
            request = conn.pending.pop(0)
            if isinstance(request, _Refusal):
                conn.send(_error_response(request.status))
                conn.closing = True
                break
            if request.upgrade:
                conn.send(_error_response(501))
                conn.closing = True
                break
            environ = self.environ(conn, request)
            if self.quick is not None and self.quick(environ):
                self.respond(conn, request, environ, *self.call_application(environ))
            else:
                conn.busy = True
                self.in_pool += 1
                self.pool.submit(self._pooled, conn, request, environ)
                break
        if not conn.busy and not conn.out and (conn.closing or (conn.eof and not conn.pending)):
            self.close(conn)

    def _pooled(self, conn: Connection, request: _Request, environ: dict) -> None:
        result = self.call_application(environ)
        self.finished.put((conn, request, environ, result))
        try:
            self.wakeup_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # a wake-up is already waiting

    def collect_finished(self) -> None:
        while True:
            try:
                conn, request, environ, result = self.finished.get_nowait()
            except queue.Empty:
                return
            self.in_pool -= 1
            conn.busy = False
            if conn.sock.fileno() < 0:
                continue
            self.respond(conn, request, environ, *result)
            self.advance(conn)

    def call_application(self, environ: dict) -> tuple[str, list, bytes]:
        """Run the WSGI application: (status line, headers, whole body). Never raises."""
        started: list = []

        def start_response(status, headers, exc_info=None):
            if exc_info and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return chunks.append

        chunks: list[bytes] = []
        try:
            result = self.wsgi(environ, start_response)
            try:
                for chunk in result:
                    if chunk:
                        chunks.append(chunk)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            if not started:
                raise RuntimeError("the application did not call start_response")
            return started[0], started[1], b"".join(chunks)
        except Exception:
            self.log.exception("Error handling request %s", environ.get("RAW_URI"))
            return "500 Internal Server Error", [("Content-Type", "text/plain")], b"Internal Server Error"

    def respond(self, conn: Connection, request: _Request, environ: dict, status: str, headers: list,
                body: bytes) -> None:
        code = int(status[:3])
        keep_alive = request.keep_alive and self.alive and not conn.eof
        self.nr += 1
        if self.max_requests and self.nr >= self.max_requests:
            if self.alive:
                self.log.info("Autorestarting worker after current request.")
            self.alive = False
            keep_alive = False
        lines = [f"HTTP/{request.version} {status}\r\n"]
        has_length = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                has_length = True
            elif lowered in ("connection", "transfer-encoding", "keep-alive"):
                continue  # hop-by-hop: this server decides
            lines.append(f"{name}: {value}\r\n")
        no_body = code in _NO_BODY or code < 200
        if not has_length and not no_body:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append(f"Date: {self.http_date()}\r\n")
        lines.append("Connection: keep-alive\r\n\r\n" if keep_alive else "Connection: close\r\n\r\n")
        head = "".join(lines).encode("latin-1")
        if request.method == "HEAD" or no_body:
            body = b""
        conn.send(head + body)
        if not keep_alive:
            conn.closing = True
        if self.log.access_log_enabled:
            self.log.access(_AccessResponse(status, headers, len(body)), request, environ,
                            timedelta(seconds=time.monotonic() - request.received))

    def http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def environ(self, conn: Connection, request: _Request) -> dict:
        """The PEP 3333 environ of a request (headers with ``_`` in their name are dropped, as
        gunicorn does by default, so that they cannot pose as others)."""
        url = request.url
        path, _, query = url.partition(b"?")
        path = path.partition(b"#")[0]
        if path.startswith(b"http://") or path.startswith(b"https://"):  # absolute form
            path = b"/" + path.split(b"/", 3)[3] if path.count(b"/") >= 3 else b"/"
        body = b"".join(request.body)
        server = self.server_address
        environ = {
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"),
            "RAW_URI": url.decode("latin-1"),
            "SERVER_PROTOCOL": f"HTTP/{request.version}",
            "SERVER_NAME": server[0],
            "SERVER_PORT": server[1],
            "REMOTE_ADDR": conn.client[0] if isinstance(conn.client, tuple) else "",
            "REMOTE_PORT": str(conn.client[1]) if isinstance(conn.client, tuple) else "",
            "CONTENT_LENGTH": str(len(body)) if body else "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": self.cfg.workers > 1,
            "wsgi.run_once": False,
        }
        for name, value in request.headers:
            if "_" in name:
                continue
            key = name.upper().replace("-", "_")
            if key == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
                continue
            if key == "CONTENT_LENGTH":
                continue  # the body's real length, set above
            key = "HTTP_" + key
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        environ.setdefault("CONTENT_TYPE", "")
        return environ

    # --- housekeeping ---------------------------------------------------------------------------
    def close(self, conn: Connection) -> None:
        if conn.watching:
            self.selector.unregister(conn.sock)
            conn.watching = 0
        self.connections.pop(conn.sock.fileno(), None)
        try:
            conn.sock.close()
        except OSError:
            pass

    def close_idle(self, now: float) -> None:
        limit = max(self.cfg.keepalive, 1)
        for conn in list(self.connections.values()):
            if not conn.busy and not conn.out and not conn.pending and now - conn.last_active > limit:
                self.close(conn)

    def stop_gracefully(self) -> None:
        """Stop accepting; let requests in flight finish and their answers go out, then close."""
        for listener in self.sockets:
            try:
                self.selector.unregister(listener)
            except (KeyError, ValueError):
                pass
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while (self.in_pool or any(c.out for c in self.connections.values())) and time.monotonic() < deadline:
            self.notify()
            for key, events in self.selector.select(timeout=0.2):
                data = key.data
                if isinstance(data, Connection) and events & selectors.EVENT_WRITE:
                    data.flush()
                elif data == "finished":
                    self._drain(self.wakeup_r)
                elif data == "signal":
                    self._drain(self.PIPE[0])
            self.collect_finished()
        for conn in list(self.connections.values()):
            self.close(conn)
        self.pool.shutdown(wait=False, cancel_futures=True)


class _Refusal:
    __slots__ = ("status",)

    def __init__(self, status: int):
        self.status = status


def _refusal(status: int) -> _Refusal:
    return _Refusal(status)


def _error_response(status: int) -> bytes:
    reason = _REASONS.get(status, "Bad Request")
    body = f"{status} {reason}\n".encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body
