"""config.gunicorn_worker.LoopWorker under a real gunicorn, over raw sockets.

The application is tests/wsgi_echo.py (no Django, no database): paths under /q/ are served
inline on the worker's loop, the others in its thread pool. One server per module serves most
tests; the behaviours that end or reconfigure a worker (SIGTERM, --max-requests, a unix socket,
--worker-connections, proxy trust) get small servers of their own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = "config.gunicorn_worker.LoopWorker"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Response:
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, version: str):
        self.status, self.reason, self.header_list, self.body, self.version = status, reason, headers, body, version
        self.headers = {name.lower(): value for name, value in headers}

    def json(self) -> dict:
        return json.loads(self.body)


class Client:
    """One HTTP connection read and written by hand, so that pipelining, partial requests and
    the server's closing of the connection can be observed."""

    def __init__(self, address, timeout: float = 5.0):
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address, timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, headers: dict | None = None, body: bytes = b"",
                version: str = "1.1") -> Response:
        self.send(build(method, path, headers, body, version))
        return self.read(head=method == "HEAD")

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def read(self, head: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"connection closed before a response head: {self.buffer!r}")
        raw, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        version, status, reason = (lines[0].split(" ", 2) + [""])[:3]
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        response = Response(int(status), reason, headers, b"", version)
        if head or response.status in (204, 304) or response.status < 200:
            return response
        if "content-length" in response.headers:
            length = int(response.headers["content-length"])
            while len(self.buffer) < length:
                if not self._fill():
                    raise ConnectionError("connection closed inside a response body")
            response.body, self.buffer = self.buffer[:length], self.buffer[length:]
        else:
            while self._fill():
                pass
            response.body, self.buffer = self.buffer, b""
        return response

    def closed_by_server(self, timeout: float = 2.0) -> bool:
        """True when the server closes the connection (EOF or reset) within ``timeout`` seconds,
        with no bytes left unread."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return not self.buffer
        except TimeoutError:
            return False
        return not data and not self.buffer

    def close(self) -> None:
        self.sock.close()


def build(method: str, path: str, headers: dict | None = None, body: bytes = b"", version: str = "1.1") -> bytes:
    headers = {"Host": "test.invalid", **(headers or {})}
    if body and "Content-Length" not in headers and "Transfer-Encoding" not in headers:
        headers["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/{version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


class Server:
    """``gunicorn tests.wsgi_echo:application -k LoopWorker -w 1 --threads 2`` in its own session."""

    def __init__(self, tmp_path: Path, *args: str, bind: str | None = None, env: dict | None = None,
                 probe: str = "/q/pid"):
        self.probe = probe
        self.address: str | tuple[str, int]
        if bind is None:
            self.address = ("127.0.0.1", free_port())
            bind = f"127.0.0.1:{self.address[1]}"
        else:
            self.address = bind.removeprefix("unix:")
        self.log_path = tmp_path / f"gunicorn-{time.monotonic_ns()}.log"
        self.log_file = open(self.log_path, "wb")
        command = [sys.executable, "-m", "gunicorn", "tests.wsgi_echo:application", "-k", WORKER, "-w", "1",
                   "--threads", "2", "-b", bind, "--no-control-socket", "--graceful-timeout", "5", *args]
        self.proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True,
                                     stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT)
        try:
            self.worker_pid = self.wait_for_worker()
        except BaseException:
            self.stop()  # no gunicorn left behind by a server that never answered
            raise

    def wait_for_worker(self, not_pid: int | None = None, timeout: float = 20.0) -> int:
        """The pid of the worker answering (one other than ``not_pid``), once it answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log()}")
            try:
                client = self.connect(timeout=1)
                try:
                    pid = int(client.request("GET", self.probe).body)
                finally:
                    client.close()
                if pid != not_pid:
                    return pid
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not answer: {self.log()}")

    def connect(self, timeout: float = 5.0) -> Client:
        return Client(self.address, timeout)

    def get(self, path: str, headers: dict | None = None) -> Response:
        client = self.connect()
        try:
            return client.request("GET", path, headers)
        finally:
            client.close()

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gunicorn")


@pytest.fixture(scope="module")
def server(tmp_dir):
    access_log = tmp_dir / "access.log"
    server = Server(tmp_dir, "--timeout", "2", "--keep-alive", "1", "--access-logfile", str(access_log))
    server.access_log = access_log
    yield server
    server.stop()


@pytest.fixture
def client(server):
    client = server.connect()
    yield client
    client.close()


# --- connections ---------------------------------------------------------------------------------

def test_keep_alive_serves_several_requests_on_one_connection(client):
    for n in range(3):
        response = client.request("GET", f"/q/echo?n={n}")
        assert response.status == 200
        assert response.headers["connection"] == "keep-alive"
        assert response.json()["environ"]["QUERY_STRING"] == f"n={n}"
    assert client.request("GET", "/echo").json()["thread"].startswith("creditdesk-web")


def test_http_10_closes_unless_keep_alive_is_asked_for(server):
    client = server.connect()
    response = client.request("GET", "/q/echo", version="1.0")
    assert response.status == 200 and response.headers["connection"] == "close"
    assert response.json()["environ"]["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert client.closed_by_server()
    client.close()

    client = server.connect()
    for _ in range(2):
        response = client.request("GET", "/q/echo", {"Connection": "keep-alive"}, version="1.0")
        assert response.status == 200 and response.headers["connection"] == "keep-alive"
    client.close()


def test_pipelined_requests_are_answered_in_order(client):
    client.send(build("GET", "/echo?n=1") + build("GET", "/q/echo?n=2") + build("POST", "/echo?n=3", body=b"x"))
    answers = [client.read().json() for _ in range(3)]
    assert [a["environ"]["QUERY_STRING"] for a in answers] == ["n=1", "n=2", "n=3"]
    assert [a["thread"].startswith("creditdesk-web") for a in answers] == [True, False, True]
    assert answers[2]["body"] == "x"


def test_expect_100_continue(client):
    client.send(build("POST", "/q/echo", {"Expect": "100-continue", "Content-Length": "5"}))
    interim = client.read()
    assert (interim.status, interim.reason) == (100, "Continue")
    client.send(b"hello")
    assert client.read().json()["body"] == "hello"


def test_a_100_continue_waits_for_the_answers_before_it(client):
    client.send(build("GET", "/slow?s=0.3") + build("POST", "/q/echo", {"Expect": "100-continue",
                                                                        "Content-Length": "2"}))
    assert client.read().body == b"slept"
    assert client.read().status == 100
    client.send(b"ok")
    assert client.read().json()["body"] == "ok"


def test_many_pipelined_requests_are_all_answered_in_order(client):
    paths = [f"/q/echo?i={i}" if i % 10 else f"/echo?i={i}" for i in range(200)]
    client.send(b"".join(build("GET", path) for path in paths))
    assert [client.read().json()["environ"]["QUERY_STRING"] for _ in paths] == [f"i={i}" for i in range(200)]


def test_requests_sent_before_the_client_half_closes_are_all_answered(client):
    client.send(build("GET", "/slow?s=0.2") + build("GET", "/q/echo?n=2") + build("GET", "/echo?n=3"))
    client.sock.shutdown(socket.SHUT_WR)
    assert client.read().body == b"slept"
    assert [client.read().json()["environ"]["QUERY_STRING"] for _ in range(2)] == ["n=2", "n=3"]
    assert client.closed_by_server()


def test_keep_alive_wait_starts_when_the_answer_is_sent(client):
    """A pooled request longer than --keep-alive (1 s): its connection is not closed as idle
    right after the answer, while the client may already be sending its next request."""
    assert client.request("GET", "/slow?s=1.1").body == b"slept"
    time.sleep(0.6)  # a sweep or more of the loop
    assert client.request("GET", "/q/echo").status == 200


def test_chunked_request_body(client):
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    response = client.request("POST", "/echo", {"Transfer-Encoding": "chunked"}, chunked)
    assert response.json()["body"] == "hello world"
    assert response.json()["environ"]["CONTENT_LENGTH"] == "11"
    assert client.request("GET", "/q/echo").status == 200  # the connection is still in step


def test_body_over_the_limit_is_refused_and_closed(server):
    client = server.connect()
    response = client.request("POST", "/q/echo", {"Content-Length": str(64 * 1024 * 1024)})
    assert response.status == 413 and response.headers["connection"] == "close"
    assert client.closed_by_server()
    client.close()

    client = server.connect()
    client.send(build("POST", "/q/echo", {"Transfer-Encoding": "chunked"}))
    chunk = b"%x\r\n" % (1024 * 1024) + b"x" * (1024 * 1024) + b"\r\n"
    try:
        for _ in range(40):
            client.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        response = client.read()
    except ConnectionResetError:
        response = None  # the answer was lost to the reset of a socket closed with unread bytes
    assert response is None or response.status == 413
    client.close()


@pytest.mark.parametrize("request_bytes, status", [
    (build("GET", "/q/echo", {"X-Big": "y" * 9000}), 431),
    (build("GET", "/q/echo", {f"X-H{n}": "1" for n in range(120)}), 431),
    (build("GET", "/q/echo?" + "z" * 9000), 414),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET /q/echo HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n", 400),
    (b"GET /q/echo HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (build("GET", "/q/echo", {"Connection": "Upgrade", "Upgrade": "websocket"}), 501),
])
def test_refused_requests_get_an_answer_and_the_connection_closed(server, request_bytes, status):
    client = server.connect()
    client.send(request_bytes)
    response = client.read()
    assert response.status == status
    assert response.headers["connection"] == "close"
    assert client.closed_by_server()
    client.close()


def test_a_refused_request_after_a_good_one_is_answered_after_it(client):
    client.send(build("GET", "/echo?n=1") + b"BROKEN\r\n\r\n")
    assert client.read().status == 200
    assert client.read().status == 400
    assert client.closed_by_server()


# --- responses -----------------------------------------------------------------------------------

def test_head_has_no_body_but_keeps_content_length(client):
    for path in ("/q/pid", "/slow?s=0"):  # a body the server measures, one with the application's length
        length = client.request("GET", path).headers["content-length"]
        response = client.request("HEAD", path)
        assert response.status == 200 and response.headers["content-length"] == length
    assert client.request("GET", "/q/pid").status == 200  # nothing stray was left on the connection
    assert client.buffer == b""


@pytest.mark.parametrize("code", [204, 304])
def test_no_body_statuses(client, code):
    response = client.request("GET", f"/q/status/{code}")
    assert response.status == code and "content-length" not in response.headers
    assert client.request("GET", "/q/pid").status == 200
    assert client.buffer == b""


def test_a_body_without_content_length_is_measured(client):
    response = client.request("GET", "/gen")
    assert response.body == b"one,two,three"
    assert response.headers["content-length"] == "13"
    assert "date" in response.headers


def test_application_errors_become_500_and_the_worker_keeps_serving(server, client):
    closes = int(client.request("GET", "/q/closes").body)
    for path in ("/q/raise", "/raise", "/q/raise-late", "/q/bad-header", "/bad-header"):
        response = client.request("GET", path)
        assert response.status == 500, path
        assert "x-injected" not in response.headers and "set-cookie" not in response.headers
    assert client.request("GET", "/q/pid").body == str(server.worker_pid).encode()
    # /q/closes itself is a list (closes nothing); raise-late and the two bad-header bodies were closed
    assert int(client.request("GET", "/q/closes").body) == closes + 3


def test_the_response_iterable_is_closed(client):
    before = int(client.request("GET", "/q/closes").body)
    client.request("GET", "/q/echo")
    client.request("GET", "/echo")
    client.request("HEAD", "/q/status/200")
    assert int(client.request("GET", "/q/closes").body) == before + 3


# --- concurrency and failures --------------------------------------------------------------------

def test_a_slow_pooled_request_does_not_hold_up_quick_ones(server):
    slow = server.connect()
    slow.send(build("GET", "/slow?s=1"))
    time.sleep(0.05)
    started = time.monotonic()
    quick = server.connect()
    timings = []
    for _ in range(5):
        t0 = time.monotonic()
        assert quick.request("GET", "/q/echo").status == 200
        timings.append(time.monotonic() - t0)
    assert time.monotonic() - started < 0.3, timings
    assert max(timings) < 0.3
    response = slow.read()
    assert response.body == b"slept" and time.monotonic() - started > 0.8
    slow.close()
    quick.close()


def test_client_disconnects_do_not_kill_the_worker(server):
    partial = server.connect()
    partial.send(b"POST /q/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly part")
    partial.close()
    gone = server.connect()
    gone.send(build("GET", "/slow?s=0.2"))
    gone.close()
    reset = server.connect()
    reset.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    reset.send(build("GET", "/slow?s=0.2") + b"GET /q/echo HTTP/1.1\r\n")
    reset.close()  # RST
    time.sleep(0.5)
    assert server.get("/q/pid").body == str(server.worker_pid).encode()


def test_idle_keep_alive_clients_are_closed_and_the_heartbeat_goes_on(server):
    """50 idle keep-alive connections: a new client is still served at once; after --keep-alive (1 s)
    the server closes them; idle for 4 s with --timeout 2, the worker is not timed out; the loop
    does not spin while it waits."""
    idle = [server.connect() for _ in range(50)]
    for client in idle[:10]:
        assert client.request("GET", "/q/pid").status == 200
    started = time.monotonic()
    assert server.get("/q/echo").status == 200
    assert time.monotonic() - started < 0.3
    cpu = cpu_seconds(server.worker_pid)
    time.sleep(4)
    assert cpu_seconds(server.worker_pid) - cpu < 0.2
    assert all(client.closed_by_server(timeout=0.5) for client in idle)
    for client in idle:
        client.close()
    assert server.get("/q/pid").body == str(server.worker_pid).encode()
    assert "WORKER TIMEOUT" not in server.log()


def test_access_log(server):
    server.get("/q/echo?logged=1")
    server.get("/echo?logged=2")
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        lines = server.access_log.read_text().splitlines()
        if any("/echo?logged=2" in line for line in lines):
            break
        time.sleep(0.05)
    assert any('"GET /q/echo?logged=1 HTTP/1.1" 200' in line for line in lines), lines
    assert any('"GET /echo?logged=2 HTTP/1.1" 200' in line for line in lines), lines


# --- environ -------------------------------------------------------------------------------------

def test_environ(client):
    response = client.request("POST", "/q/echo?a=%20b",
                              {"Content-Type": "text/plain", "X-Multi": "1", "X_Sneaky": "no"}, b"body")
    env = response.json()["environ"]
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == "" and env["PATH_INFO"] == "/q/echo" and env["QUERY_STRING"] == "a=%20b"
    assert env["CONTENT_TYPE"] == "text/plain" and env["CONTENT_LENGTH"] == "4"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("127.0.0.1", str(client.sock.getpeername()[1]))
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["wsgi.url_scheme"] == "http"
    assert env["HTTP_X_MULTI"] == "1" and "HTTP_X_SNEAKY" not in env
    env = client.request("GET", "/q/echo/caf%C3%A9%2Fx", {"Host": "example.com:8443"}).json()["environ"]
    assert env["PATH_INFO"] == "/q/echo/café/x".encode().decode("latin-1")  # PEP 3333: bytes as latin-1
    assert env["RAW_URI"] == "/q/echo/caf%C3%A9%2Fx"
    assert env["HTTP_HOST"] == "example.com:8443"


def test_repeated_headers_are_joined(client):
    client.send(b"GET /q/echo HTTP/1.1\r\nHost: a\r\nX-Multi: 1\r\nX-Multi: 2\r\n\r\n")
    assert client.read().json()["environ"]["HTTP_X_MULTI"] == "1,2"


def test_a_trusted_proxy_sets_the_scheme(client):
    """127.0.0.1 is in gunicorn's default --forwarded-allow-ips."""
    assert client.request("GET", "/q/echo", {"X-Forwarded-Proto": "https"}).json()["environ"][
        "wsgi.url_scheme"] == "https"
    env = client.request("GET", "/echo", {"X-Forwarded-Proto": "http"}).json()["environ"]
    assert env["wsgi.url_scheme"] == "http"
    response = client.request("GET", "/q/echo", {"X-Forwarded-Proto": "https", "X-Forwarded-Ssl": "off"})
    assert response.status == 400  # contradicting scheme headers, as gunicorn answers


# --- servers of their own ------------------------------------------------------------------------

def test_a_trusted_proxy_sets_script_name(client):
    env = client.request("GET", "/q/echo", {"Script_Name": "/q"}).json()["environ"]
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/q", "/echo")


def test_an_untrusted_peer_cannot_set_the_scheme_and_no_keep_alive(tmp_dir):
    server = Server(tmp_dir, "--forwarded-allow-ips", "10.9.9.9", "--keep-alive", "0")
    try:
        client = server.connect()
        response = client.request("GET", "/q/echo", {"X-Forwarded-Proto": "https", "Script_Name": "/q"})
        env = response.json()["environ"]
        assert env["wsgi.url_scheme"] == "http"
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/q/echo")
        assert response.headers["connection"] == "close" and client.closed_by_server()
        client.close()
    finally:
        server.stop()


def test_unix_socket_and_script_name(tmp_dir):
    path = str(tmp_dir / "creditdesk.sock")
    server = Server(tmp_dir, bind=f"unix:{path}", env={"SCRIPT_NAME": "/app"}, probe="/app/q/pid")
    try:
        client = server.connect()
        env = client.request("GET", "/app/q/echo?x=1", {"Host": "example.com"}).json()["environ"]
        assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["QUERY_STRING"]) == ("/app", "/q/echo", "x=1")
        assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("example.com", "80")
        assert env["REMOTE_ADDR"] == ""
        assert client.request("GET", "/app/echo", {"X-Forwarded-Proto": "https"}).json()["environ"][
            "wsgi.url_scheme"] == "https"  # a unix socket's peer is trusted, as in gunicorn
        client.close()
        for outside in ("/application/q/echo", "/other"):
            client = server.connect()
            response = client.request("GET", outside)
            assert response.status == 404 and response.headers["connection"] == "close"
            client.close()
    finally:
        server.stop()


def test_worker_connections_limit_without_spinning(tmp_dir):
    server = Server(tmp_dir, "--worker-connections", "3", "--keep-alive", "30")
    try:
        held = [server.connect() for _ in range(3)]
        for client in held:
            assert client.request("GET", "/q/pid").status == 200
        waiting = server.connect()
        waiting.send(build("GET", "/q/echo"))
        cpu = cpu_seconds(server.worker_pid)
        time.sleep(0.6)
        assert cpu_seconds(server.worker_pid) - cpu < 0.15  # the loop does not spin on the listener
        waiting.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            waiting.sock.recv(1)
        held.pop().close()
        waiting.sock.settimeout(5)
        assert waiting.read().status == 200
        for client in held + [waiting]:
            client.close()
    finally:
        server.stop()


def test_sigterm_lets_an_in_flight_pooled_request_finish(tmp_dir):
    server = Server(tmp_dir)
    try:
        slow = server.connect()
        slow.send(build("GET", "/slow?s=1"))
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        response = slow.read()
        assert response.status == 200 and response.body == b"slept"
        assert response.headers["connection"] == "close"
        assert server.proc.wait(timeout=10) == 0
    finally:
        server.stop()


def test_max_requests_restarts_the_worker(tmp_dir):
    server = Server(tmp_dir, "--max-requests", "4", "--max-requests-jitter", "0")
    try:
        first = server.worker_pid  # the readiness probe was request 1
        client = server.connect()
        assert client.request("GET", "/q/pid").headers["connection"] == "keep-alive"
        assert client.request("GET", "/pid").headers["connection"] == "keep-alive"
        last = client.request("GET", "/q/pid")
        assert last.body == str(first).encode() and last.headers["connection"] == "close"
        assert client.closed_by_server()
        client.close()
        assert server.wait_for_worker(not_pid=first) != first
        assert "Autorestarting worker" in server.log()
    finally:
        server.stop()


def test_concurrent_clients_all_get_their_own_answers(server):
    errors = []

    def run(n: int) -> None:
        try:
            client = server.connect()
            for i in range(20):
                path = f"/q/echo?c={n}&i={i}" if i % 3 else f"/echo?c={n}&i={i}"
                assert client.request("GET", path).json()["environ"]["QUERY_STRING"] == f"c={n}&i={i}"
            client.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
