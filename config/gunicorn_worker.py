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

What it guarantees, as a gunicorn worker (tests/test_gunicorn_worker.py):
- HTTP/1.0 and 1.1 with keep-alive (``--keep-alive`` seconds idle, 0: none),
  pipelining (answers in request order; a connection's next requests are read
  once its answers are out), ``Expect: 100-continue``, chunked request bodies;
  a request line, header or body over gunicorn's ``--limit-request-*`` settings or
  ``MAX_BODY`` (a declared Content-Length is refused before the body is read)
  gets a 4xx and the connection closed; a malformed request a 400, after the
  answers to the requests before it.
- Responses are buffered whole and carry ``Content-Length`` (measured when the
  application gives none), ``Date`` and ``Connection: close`` when the
  connection ends; HEAD, 1xx, 204 and 304 answers carry no body. A status or
  header the application gives that would break the response (CR/LF, not
  latin-1) becomes a 500.
- The WSGI iterable is always closed (Django's ``request_finished``: database
  connections are returned); an application error becomes a plain 500 and the
  worker serves on.
- The environ as gunicorn builds it: ``SCRIPT_NAME`` from the environment
  (``--env SCRIPT_NAME=/prefix``; a path outside it: 404) or, from a trusted
  proxy, the ``SCRIPT_NAME`` header; ``wsgi.url_scheme`` https when a peer in
  ``--forwarded-allow-ips`` (a unix-socket peer always) sends one of
  ``--secure-scheme-headers`` with its secure value (contradicting ones: 400);
  headers with ``_`` dropped unless ``--forwarder-headers``/``--header-map``
  say otherwise; REMOTE_ADDR the peer; SERVER_NAME/PORT the listening address
  (the Host header's on a unix socket).
- Heartbeat to the arbiter every half second while the loop turns (a quick
  request that blocks the loop past ``--timeout`` gets the worker restarted),
  ``--max-requests``, ``--worker-connections`` (over it, no more are accepted
  until one closes), idle connections closed after ``--keep-alive`` seconds (a
  half-received request after ``--timeout``), graceful stop on SIGTERM (requests
  in flight finish within ``--graceful-timeout`` and their answers go out),
  gunicorn's access log, TCP and unix-socket binds.
Not supported: TLS (terminate it in front; ``--certfile`` refuses to boot), HTTP/2,
protocol upgrades (``Connection: Upgrade``, answered 501), streaming responses.
"""

from __future__ import annotations

import errno
import gc
import io
import ipaddress
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
from gunicorn import SERVER_SOFTWARE
from gunicorn.workers import base

# The largest request body read into memory (bigger: 413). Django applies its own,
# smaller limits (DATA_UPLOAD_MAX_MEMORY_SIZE) to what it parses.
MAX_BODY = 32 * 1024 * 1024
RECV_SIZE = 256 * 1024
_REASONS = {400: "Bad Request", 404: "Not Found", 413: "Request Entity Too Large", 414: "Request-URI Too Long",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented"}
_NO_BODY = frozenset((204, 304))


class RequestRefused(Exception):
    """A request this server answers itself with ``status`` and closes the connection after."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Request:
    __slots__ = ("method", "url", "headers", "body", "keep_alive", "version", "upgrade", "received", "expect")

    def __init__(self):
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.upgrade = False
        self.expect = False  # a 100 Continue is owed once the answers before it are out


class Connection:
    """One client socket: its parser, the requests parsed and not yet answered, the bytes
    still to send. Only the loop thread touches it, except ``busy`` requests' environ."""

    def __init__(self, worker: LoopWorker, sock: socket.socket, client, server: tuple[str, str] | None,
                 trusted: bool):
        self.worker, self.sock, self.client = worker, sock, client
        self.server = server  # (SERVER_NAME, SERVER_PORT) of the listener; None on a unix socket
        self.trusted = trusted  # the peer may set the scheme and forwarder headers
        self.parser = httptools.HttpRequestParser(self)
        self.current: _Request | None = None
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
        self.body_bytes = 0

    def on_url(self, url: bytes):
        limit = self.worker.limit_request_line
        self.current.url += url  # the parser may hand the URL over in pieces
        if limit and len(self.current.url) > limit:
            raise RequestRefused(414, "Request-URI Too Long")

    def on_header(self, name: bytes, value: bytes):
        worker = self.worker
        request = self.current
        headers = request.headers
        if worker.limit_request_fields and len(headers) >= worker.limit_request_fields:
            raise RequestRefused(431, "Too many header fields")
        if worker.limit_request_field_size and len(name) + len(value) > worker.limit_request_field_size:
            raise RequestRefused(431, "Header field too large")
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            if value.strip().isdigit() and int(value) > MAX_BODY:
                raise RequestRefused(413, "Request body too large")
        elif size == 6 and name.lower() == b"expect":
            request.expect = value.strip().lower() == b"100-continue"
        elif b"_" in name and not (
                worker.header_map == "dangerous"
                or (self.trusted and name.decode("latin-1").upper() in worker.forwarder_headers)):
            # "X_Forwarded_For" must not pose as X-Forwarded-For (both are HTTP_X_FORWARDED_FOR)
            if worker.header_map == "drop":
                return
            raise RequestRefused(400, "Header name with an underscore")
        headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self):
        request, parser = self.current, self.parser
        request.method = parser.get_method().decode("ascii")
        request.version = parser.get_http_version()
        request.upgrade = parser.should_upgrade()
        if request.expect:
            # RFC 9110 10.1.1: ignored from an HTTP/1.0 client; otherwise sent now, unless answers to
            # earlier requests of this connection are still due (then ``LoopWorker.advance`` sends it).
            request.expect = request.version != "1.0"
            if request.expect and not self.busy and not self.pending:
                request.expect = False
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
        cfg = self.cfg
        if cfg.is_ssl:
            raise RuntimeError("config.gunicorn_worker.LoopWorker does not speak TLS: terminate it in front")
        # the settings read on every request, copied: a gunicorn Config attribute costs ~0.6 us
        self.limit_request_line = cfg.limit_request_line
        self.limit_request_fields = cfg.limit_request_fields
        self.limit_request_field_size = cfg.limit_request_field_size
        self.header_map = cfg.header_map
        self.forwarder_headers = frozenset(cfg.forwarder_headers)
        self.keepalive = cfg.keepalive
        self.worker_connections = cfg.worker_connections
        self.multiprocess = cfg.workers > 1
        self.selector = selectors.DefaultSelector()
        self.pool = ThreadPoolExecutor(max(1, self.cfg.threads), thread_name_prefix="creditdesk-web")
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)
        self.connections: dict[int, Connection] = {}
        self.in_pool = 0
        self.accepting = False
        self._date = (0, b"")
        super().init_process()

    # --- the loop -----------------------------------------------------------------------------
    def run(self):
        # The application is loaded (and, with --preload, shared with the arbiter): its objects live
        # as long as the worker, so the garbage collector need not walk them on every collection.
        gc.freeze()
        self.listeners = {}
        for listener in self.sockets:
            listener.setblocking(False)
            address = listener.getsockname()
            self.listeners[listener] = (str(address[0]), str(address[1])) if isinstance(address, tuple) else None
        self.accept_more()
        os.set_blocking(self.PIPE[0], False)
        self.selector.register(self.PIPE[0], selectors.EVENT_READ, "signal")
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "finished")
        self.quick = getattr(self.wsgi, "is_quick", None)
        cfg = self.cfg
        # gunicorn reads SCRIPT_NAME from the environment (``--env`` sets it there before this runs)
        self.script_name = os.environ.get("SCRIPT_NAME", "").rstrip("/")
        self.scheme_keys = {"HTTP_" + name.upper().replace("-", "_"): value
                            for name, value in cfg.secure_scheme_headers.items()}
        self.allow_all = "*" in cfg.forwarded_allow_ips
        self.allow_networks = cfg.forwarded_allow_networks()
        last_beat = 0.0
        while self.alive:
            for key, events in self.selector.select(timeout=0.5):
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
            now = time.monotonic()
            if now - last_beat >= 0.5:  # a syscall or two: not on every turn of a busy loop
                last_beat = now
                self.notify()
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    break
                self.close_idle(now)
                self.accept_more()
        self.stop_gracefully()

    def _drain(self, fd) -> None:
        try:
            while (os.read(fd, 4096) if isinstance(fd, int) else fd.recv(4096)):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def accept(self, listener) -> None:
        # One connection per wake-up: every worker is woken for a new connection, and a worker
        # that took a burst of them would serve them all, one request at a time, while the
        # other workers sat idle (a benchmark's clients all connect at once).
        if len(self.connections) >= self.worker_connections:
            self.accept_no_more()  # until a connection closes; the others wait in the backlog
            return
        try:
            sock, client = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.log.warning("Out of file descriptors: no new connections for now")
                self.accept_no_more()  # until a connection closes or the next heartbeat
                return
            if exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                raise
            return
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(self, sock, client, self.listeners[listener], self.trusts(client))
        self.connections[sock.fileno()] = conn
        self.watch(conn)
        if len(self.connections) >= self.worker_connections:
            self.accept_no_more()

    def accept_more(self) -> None:
        """Watch the listeners again, unless stopping or still at ``--worker-connections``."""
        if not self.accepting and self.alive and len(self.connections) < self.worker_connections:
            for listener in self.listeners:
                self.selector.register(listener, selectors.EVENT_READ, "accept")
            self.accepting = True

    def accept_no_more(self) -> None:
        """Stop watching the listeners (a listener with a waiting client would wake the loop at once)."""
        if self.accepting:
            for listener in self.listeners:
                self.selector.unregister(listener)
            self.accepting = False

    def trusts(self, client) -> bool:
        """Whether the peer may set the scheme and forwarder headers: in ``--forwarded-allow-ips``, or
        on a unix socket (as gunicorn decides)."""
        if not isinstance(client, tuple) or self.allow_all:
            return True
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        return any(address in network for network in self.allow_networks)

    def watch(self, conn: Connection) -> None:
        """Register the connection for what it waits on: writing while bytes are left to
        send, reading while it can still take a request and owes no answer (none in the pool,
        none parsed and waiting, nothing left to send: a client cannot pile requests up)."""
        if conn.sock.fileno() < 0:
            return
        wanted = 0
        if conn.out:
            wanted |= selectors.EVENT_WRITE
        elif not conn.eof and not conn.closing and not conn.busy and not conn.pending:
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
        """Answer the connection's next parsed requests, in order, unless one is in flight; send a
        100 Continue owed to the request being received once the answers before it are out;
        close the connection when done."""
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
            try:
                environ = self.environ(conn, request)
            except RequestRefused as refused:
                conn.send(_error_response(refused.status))
                conn.closing = True
                break
            if self.is_quick(environ):
                self.respond(conn, request, environ, *self.call_application(environ))
            else:
                conn.busy = True
                self.in_pool += 1
                self.pool.submit(self._pooled, conn, request, environ)
                break
        current = conn.current
        if current is not None and current.expect and not conn.busy and not conn.pending and not conn.closing:
            current.expect = False
            conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not conn.busy and not conn.out and (conn.closing or (conn.eof and not conn.pending)):
            self.close(conn)
        else:
            self.watch(conn)

    def is_quick(self, environ: dict) -> bool:
        """The application's ``is_quick(environ)``; False without one or when it fails."""
        if self.quick is None:
            return False
        try:
            return self.quick(environ)
        except Exception:
            self.log.exception("is_quick failed for %s", environ.get("RAW_URI"))
            return False

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
        """Write the answer to ``request``: keep-alive unless the client, ``--keep-alive 0``, a
        stopping worker or a client that sent its last request says otherwise."""
        # after the client's end of stream, the requests it sent before still get their answers
        keep_alive = (request.keep_alive and self.alive and self.keepalive > 0
                      and not (conn.eof and not conn.pending))
        self.nr += 1
        if self.nr >= self.max_requests:
            if self.alive:
                self.log.info("Autorestarting worker after current request.")
            self.alive = False
            keep_alive = False
        try:
            code, head = self._head(request, status, headers, len(body), keep_alive)
        except (ValueError, TypeError, UnicodeEncodeError):
            self.log.exception("Invalid response to %s: %r %r", environ.get("RAW_URI"), status, headers)
            status, headers, body = "500 Internal Server Error", [("Content-Type", "text/plain")], b"Internal Server Error"
            code, head = self._head(request, status, headers, len(body), keep_alive)
        if request.method == "HEAD" or code in _NO_BODY or code < 200:
            body = b""
        conn.send(head + body)
        conn.last_active = time.monotonic()  # the keep-alive wait starts now
        if not keep_alive:
            conn.closing = True
        if self.log.access_log_enabled:
            self.log.access(_AccessResponse(status, headers, len(body)), request, environ,
                            timedelta(seconds=time.monotonic() - request.received))

    def _head(self, request: _Request, status: str, headers: list, length: int, keep_alive: bool) -> tuple[int, bytes]:
        """The status code and the encoded head of an answer. Raises ValueError for a status or
        header that would break the message (a CR or LF in it, no 3-digit code), UnicodeEncodeError
        for one not in latin-1."""
        code = int(status[:3])
        if code < 100 or status[3:4] not in ("", " "):
            raise ValueError("bad status")
        lines = [f"HTTP/{request.version} {status}\r\n"]
        has_length = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                has_length = True
            elif lowered in ("connection", "transfer-encoding", "keep-alive"):
                continue  # hop-by-hop: this server decides
            lines.append(f"{name}: {value}\r\n")
        if not has_length and code not in _NO_BODY and code >= 200:
            lines.append(f"Content-Length: {length}\r\n")
        lines.append(f"Date: {self.http_date()}\r\n")
        lines.append("Connection: keep-alive\r\n\r\n" if keep_alive else "Connection: close\r\n\r\n")
        head = "".join(lines)
        # one CR LF per line and the blank line: any other CR or LF came from the application
        if head.count("\n") != len(lines) + 1 or head.count("\r") != len(lines) + 1:
            raise ValueError("CR or LF in the status or a header")
        return code, head.encode("latin-1")

    def http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def environ(self, conn: Connection, request: _Request) -> dict:
        """The PEP 3333 environ of a request, as gunicorn's ``http.wsgi.create`` makes it (see the
        module docstring). Raises RequestRefused: 400 for contradicting scheme headers, 404 for a
        path outside SCRIPT_NAME. Headers with ``_`` in their name were dropped by the parser
        (unless allowed), so that they cannot pose as others."""
        url = request.url
        path, _, query = url.partition(b"?")
        path = path.partition(b"#")[0]
        query = query.partition(b"#")[0]
        if path.startswith(b"http://") or path.startswith(b"https://"):  # absolute form
            path = b"/" + path.split(b"/", 3)[3] if path.count(b"/") >= 3 else b"/"
        body = b"".join(request.body)
        client = conn.client
        environ = {
            "REQUEST_METHOD": request.method,
            "QUERY_STRING": query.decode("latin-1"),
            "RAW_URI": url.decode("latin-1"),
            "SERVER_PROTOCOL": f"HTTP/{request.version}",
            "SERVER_SOFTWARE": SERVER_SOFTWARE,
            "REMOTE_ADDR": client[0] if isinstance(client, tuple) else _text(client),
            "CONTENT_LENGTH": str(len(body)) if body else "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": self.multiprocess,
            "wsgi.run_once": False,
        }
        if isinstance(client, tuple):
            environ["REMOTE_PORT"] = str(client[1])
        scheme_keys = self.scheme_keys if conn.trusted else _NONE
        scheme = None
        for name, value in request.headers:
            key = name.upper().replace("-", "_")
            if key == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
                continue
            if key == "CONTENT_LENGTH":
                continue  # the body's real length, set above
            key = "HTTP_" + key
            if key in scheme_keys:
                secure = "https" if value.strip() == scheme_keys[key] else "http"
                if scheme is not None and secure != scheme:
                    raise RequestRefused(400, "Contradicting scheme headers")
                scheme = environ["wsgi.url_scheme"] = secure
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        environ.setdefault("CONTENT_TYPE", "")
        # a trusted proxy's SCRIPT_NAME header (only kept when allowed, see on_header) wins
        script_name = environ.get("HTTP_SCRIPT_NAME", self.script_name).rstrip("/")
        if script_name:
            prefix = script_name.encode("latin-1")
            if path != prefix and not path.startswith(prefix + b"/"):
                raise RequestRefused(404, "Outside SCRIPT_NAME")
            path = path[len(prefix):]
        environ["SCRIPT_NAME"] = script_name
        environ["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1")
        server = conn.server
        if server is None:  # a unix socket: the Host header says which server the client asked for
            server = _host_and_port(environ.get("HTTP_HOST", ""), environ["wsgi.url_scheme"])
        environ["SERVER_NAME"], environ["SERVER_PORT"] = server
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
        if not self.accepting:
            self.accept_more()

    def close_idle(self, now: float) -> None:
        """Close connections idle between requests for ``--keep-alive`` seconds, and those in the
        middle of sending a request for ``--timeout`` seconds."""
        idle = max(self.cfg.keepalive, 1)
        receiving = max(self.cfg.timeout, idle)
        for conn in list(self.connections.values()):
            if not conn.busy and not conn.out and not conn.pending:
                if now - conn.last_active > (idle if conn.current is None else receiving):
                    self.close(conn)

    def stop_gracefully(self) -> None:
        """Stop accepting and reading; let requests in flight finish and their answers go out
        (within ``--graceful-timeout``); close every connection."""
        self.accept_no_more()
        for conn in list(self.connections.values()):
            conn.eof = True  # read nothing more: no new request starts
            self.watch(conn)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while time.monotonic() < deadline:
            for conn in list(self.connections.values()):
                if not conn.busy and not conn.out:
                    self.close(conn)
            if not self.connections:
                break
            self.notify()
            for key, _events in self.selector.select(timeout=0.2):
                data = key.data
                if isinstance(data, Connection):
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


_NONE: dict = {}


def _text(client) -> str:
    """REMOTE_ADDR for a unix-socket peer (its address, usually empty), as gunicorn sets it."""
    return client.decode("latin-1") if isinstance(client, bytes) else str(client or "")


def _host_and_port(host: str, scheme: str) -> tuple[str, str]:
    """SERVER_NAME and SERVER_PORT from a Host header ("name", "name:port", "[v6]:port")."""
    if not host:
        return "", ""
    if host.startswith("["):
        name, _, rest = host.partition("]")
        name, port = name + "]", rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = host.partition(":")
    return name, port or ("443" if scheme == "https" else "80")


def _error_response(status: int) -> bytes:
    reason = _REASONS.get(status, "Bad Request")
    body = f"{status} {reason}\n".encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body
