"""A small closed-loop HTTP/1.1 load generator for the benchmark.

Each client has one persistent keep-alive socket to the server; it sends a
request, reads the whole response, records the latency and sends the next one.
All clients run in one thread around one ``selectors`` loop. Requests are
pre-built bytes and responses are parsed only as far as the status line and
``Content-Length``, so a client costs a few tens of microseconds of CPU per
request (the run reports the generator's own CPU use to show it is not the
bottleneck).
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class HttpError(RuntimeError):
    pass


class Connection:
    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(self, raw: bytes) -> tuple[int, bytes]:
        self.sock.sendall(raw)
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked or length is None:
            raise HttpError("response without Content-Length (chunked bodies are not measured)")
        while len(rest) < length:
            rest += self._recv()
        body, rest = rest[:length], rest[length:]
        self.buffer = rest
        return status, body

    def _fill(self) -> None:
        self.buffer += self._recv()

    def _recv(self) -> bytes:
        data = self.sock.recv(262144)
        if not data:
            raise HttpError("server closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


def build_request(method: str, path: str, *, token: str, body: dict | None = None) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {token}",
            "Connection: keep-alive"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, measured window only
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    client_cpu: float = 0.0  # CPU seconds used by this process, warm-up included
    total_requests: int = 0  # warm-up included
    sample_bodies: list[bytes] = field(default_factory=list)


def run_load(
    *, host: str, port: int, clients: int, make_request: Callable[[int, int], bytes], warmup: float,
    seconds: float, expect: tuple[int, ...],
) -> LoadResult:
    """Run ``clients`` closed-loop clients for ``warmup + seconds``; measure the last ``seconds``.

    ``make_request(client, n)`` returns the raw request bytes of a client's n-th request.
    All clients share one thread and one ``selectors`` loop (non-blocking sockets):
    no thread switches or GIL hand-overs per response, so the generator takes as
    little as possible of the cores it shares with the server.
    """
    result = LoadResult()
    selector = selectors.DefaultSelector()
    states = []
    for index in range(clients):
        try:
            sock = socket.create_connection((host, port))
        except OSError as exc:
            result.errors.append(f"connect: {exc}")
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        states.append(_Client(index, sock))
    cpu0 = time.process_time()
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds
    for state in states:
        state.send_next(make_request, selector)
    while selector.get_map():
        for key, events in selector.select(timeout=1.0):
            state: _Client = key.data
            try:
                if events & selectors.EVENT_WRITE and state.out:
                    state.flush(selector)
                if events & selectors.EVENT_READ:
                    answer = state.receive()
                    if answer is None:
                        continue
                    status, body = answer
                    t1 = time.perf_counter()
                    result.total_requests += 1
                    if state.started >= measure_from:
                        result.latencies.append(t1 - state.started)
                        result.statuses[status] = result.statuses.get(status, 0) + 1
                    if status not in expect and len(result.sample_bodies) < 3:
                        result.sample_bodies.append(body[:500])
                    if t1 >= stop_at:
                        state.close(selector)
                    else:
                        state.send_next(make_request, selector)
            except (OSError, HttpError) as exc:
                result.errors.append(f"client {state.index}: {exc}")
                state.close(selector)
        if time.perf_counter() > stop_at + 60:
            result.errors.append("clients still waiting 60 s after the end")
            for key in list(selector.get_map().values()):
                key.data.close(selector)
    result.client_cpu = time.process_time() - cpu0
    result.elapsed = seconds
    return result


class _Client:
    """One keep-alive connection of the closed loop: its outgoing bytes and incoming buffer."""

    def __init__(self, index: int, sock: socket.socket):
        self.index, self.sock = index, sock
        self.n = 0
        self.out = b""
        self.buffer = b""
        self.started = 0.0
        self.registered = 0

    def _watch(self, selector, events: int) -> None:
        if events != self.registered:
            if self.registered:
                selector.modify(self.sock, events, self)
            else:
                selector.register(self.sock, events, self)
            self.registered = events

    def send_next(self, make_request, selector) -> None:
        self.out = make_request(self.index, self.n)
        self.n += 1
        self.started = time.perf_counter()
        self.flush(selector)

    def flush(self, selector) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            sent = 0
        self.out = self.out[sent:]
        self._watch(selector, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0))

    def receive(self) -> tuple[int, bytes] | None:
        """The whole response once it has arrived, else None (wait for more)."""
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return None
        if not data:
            raise HttpError("server closed the connection")
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = self.buffer[:head_end]
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                raise HttpError("response without Content-Length (chunked bodies are not measured)")
        if length is None:
            raise HttpError("response without Content-Length (chunked bodies are not measured)")
        end = head_end + 4 + length
        if len(self.buffer) < end:
            return None
        status = int(head.split(b" ", 2)[1])
        body, self.buffer = self.buffer[head_end + 4:end], self.buffer[end:]
        return status, body

    def close(self, selector) -> None:
        if self.registered:
            selector.unregister(self.sock)
            self.registered = 0
        self.sock.close()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[index]
