"""A small closed-loop HTTP/1.1 load generator for the benchmark.

Each client is a thread with one persistent keep-alive socket to the server; it
sends a request, reads the whole response, records the latency and sends the
next one. Requests are pre-built bytes and responses are parsed only as far as
the status line and ``Content-Length``, so a client costs a few tens of
microseconds of CPU per request (the run reports the generator's own CPU use to
show it is not the bottleneck). Sockets spend their waiting time in ``recv``,
which releases the GIL.
"""

from __future__ import annotations

import json
import socket
import threading
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
    """
    result = LoadResult()
    lock = threading.Lock()
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        samples: list[bytes] = []
        try:
            conn = Connection(host, port)
        except OSError as exc:
            with lock:
                result.errors.append(f"connect: {exc}")
            barrier.wait()
            return
        barrier.wait()
        n = 0
        sent = 0
        try:
            while True:
                raw = make_request(index, n)
                n += 1
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    break
                status, body = conn.request(raw)
                t1 = time.perf_counter()
                sent += 1
                if t0 >= measure_from:
                    latencies.append(t1 - t0)
                    statuses[status] = statuses.get(status, 0) + 1
                if status not in expect and len(samples) < 3:
                    samples.append(body[:500])
        except (OSError, HttpError) as exc:
            with lock:
                result.errors.append(f"client {index}: {exc}")
        finally:
            conn.close()
        with lock:
            result.total_requests += sent
            result.latencies.extend(latencies)
            for code, count in statuses.items():
                result.statuses[code] = result.statuses.get(code, 0) + count
            result.sample_bodies.extend(samples)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    cpu0 = time.process_time()
    for thread in threads:
        thread.join(timeout=warmup + seconds + 60)
    result.client_cpu = time.process_time() - cpu0
    result.elapsed = seconds
    return result


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[index]
