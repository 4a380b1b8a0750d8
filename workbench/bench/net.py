"""`workbench bench net`: does the shaping proxy give the round-trip time and rate it is set to?

Everything runs on loopback in one process: a small upstream server (`LoopbackServer`, threads
and blocking sockets), the proxy in a trio loop of its own thread, and a client in the calling
thread. For each setting the benchmark measures

- RTT: 1-byte request/response ping-pong on one connection, the median of N exchanges;
- throughput: a download of a few MB from the server (the direction registry reads take),
  bytes after the first chunk divided by the time from the first byte to the last, so that
  the latency of the request does not count against the rate.

Each figure is printed next to the configured value and their ratio (target: within 10%).
The first rows are the floor: the same client straight to the server, and through the
proxy with no shaping.

Caveats:
- the client, the server and the proxy share the GIL and the machine's cores, so the
  highest rates measure the proxy's CPU cost as much as its pacing;
- sizes are chosen to keep each download under about 4 s of the configured rate
  (1-50 MB), so a slow preset measures a shorter transfer.
"""

from __future__ import annotations

import io
import socket
import socketserver
import statistics
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from workbench.bench.formats import Table
from workbench.net.shape import ShapingProxy, mbps_to_bytes

MB = 1_000_000

ECHO: bytes = b"e"
"""Mode byte: echo everything until EOF, then half-close."""
DOWNLOAD: bytes = b"d"
"""Mode byte, then a big-endian u64 n: send n bytes, half-close, wait for EOF."""
RESET: bytes = b"r"
"""Mode byte: read one more byte, then close with a reset."""

_PATTERN = bytes(range(256)) * 256


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = sock.recv(1)
        if mode == ECHO:
            _echo(sock)
        elif mode == DOWNLOAD:
            (size,) = struct.unpack(">Q", _recv_exactly(sock, 8))
            _send_pattern(sock, size)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 16):
                pass
        elif mode == RESET:
            sock.recv(1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # now, before socketserver's orderly shutdown could send a FIN


def _echo(sock: socket.socket) -> None:
    while data := sock.recv(1 << 16):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def _send_pattern(sock: socket.socket, size: int) -> None:
    view = memoryview(_PATTERN)
    while size > 0:
        size -= sock.send(view[: min(size, len(view))])


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    parts = []
    while size:
        part = sock.recv(size)
        if not part:
            raise ConnectionError("loopback server: peer closed before sending its request")
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # peers that reset are part of the tests; nothing to report


@contextmanager
def loopback_server() -> Iterator[int]:
    """A test upstream on 127.0.0.1 (modes ECHO, DOWNLOAD, RESET); yields its port.

    On exit the server stops and joins its threads.
    """
    import threading

    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, name="loopback-server", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def connect(port: int, mode: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(mode)
    return sock


# ---------------------------------------------------------------------------------------------
# Measurements


def ping_pong(port: int, count: int) -> list[float]:
    """Round-trip times in seconds of `count` 1-byte exchanges on one connection."""
    times = []
    with connect(port, ECHO) as sock:
        sock.sendall(b"x")  # the first exchange also pays for the upstream connect
        sock.recv(1)
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(b"x")
            if not sock.recv(1):
                raise ConnectionError("echo connection closed during ping-pong")
            times.append(time.perf_counter() - start)
    return times


def download_mbps(port: int, size: int) -> float:
    """Rate in Mbit/s of a `size`-byte download, from the first byte received to the last."""
    with connect(port, DOWNLOAD + struct.pack(">Q", size)) as sock:
        first = sock.recv(1 << 16)
        start = time.perf_counter()
        received = 0
        while received < size - len(first):
            part = sock.recv(1 << 20)
            if not part:
                raise ConnectionError(f"download ended after {received + len(first)} of {size}")
            received += len(part)
        elapsed = time.perf_counter() - start
    return received * 8 / elapsed / 1e6


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class NetBenchmark:
    """Settings to measure: (rtt_ms, mbps or None) pairs, and how much to measure."""

    links: list[tuple[float, float | None]] = field(
        default_factory=lambda: [
            (10, None),
            (50, None),
            (0, 25),
            (0, 100),
            (0, 1000),
            (50, 25),
        ]
    )
    max_bytes: int = 50 * MB
    seconds_per_transfer: float = 4.0
    ping_seconds: float = 2.0

    @classmethod
    def quick(cls) -> NetBenchmark:
        return cls(
            links=[(20, None), (0, 50), (20, 200)],
            max_bytes=10 * MB,
            seconds_per_transfer=1.0,
            ping_seconds=0.5,
        )

    def transfer_size(self, mbps: float | None) -> int:
        if not mbps:
            return self.max_bytes
        return int(min(self.max_bytes, max(MB, mbps_to_bytes(mbps) * self.seconds_per_transfer)))

    def ping_count(self, rtt_ms: float) -> int:
        return int(min(200, max(10, self.ping_seconds * 1000 / max(rtt_ms, 1))))


def bench_shape(
    settings: NetBenchmark | None = None, out: io.TextIOBase | None = None
) -> list[Table]:
    """Measure RTT and download rate through the proxy for each setting; print and return."""
    settings = settings or NetBenchmark()
    out = out if out is not None else sys.stdout  # type: ignore[assignment]

    rtt = Table(
        "shaping proxy: round-trip time (1-byte ping-pong, median)",
        ["path", "rtt set ms", "measured ms", "ratio"],
    )
    rate = Table(
        "shaping proxy: download rate",
        ["path", "rate set Mbit/s", "MB moved", "measured Mbit/s", "ratio"],
    )

    with loopback_server() as port:
        _measure_floor(port, settings, rtt, rate)
        for rtt_ms, mbps in settings.links:
            _measure_link(port, settings, rtt_ms, mbps, rtt, rate)

    rtt.notes.append("ratio = measured / set; the floor rows are what the path adds by itself")
    rate.notes.append("bytes after the first chunk over the time from first byte to last")
    for table in (rtt, rate):
        print(table.render(), end="\n\n", file=out)
    return [rtt, rate]


def _measure_floor(port: int, settings: NetBenchmark, rtt: Table, rate: Table) -> None:
    size = settings.transfer_size(None)
    direct_rtt = statistics.median(ping_pong(port, 200)) * 1000
    rtt.rows.append(["direct", "-", direct_rtt, "-"])
    rate.rows.append(["direct", "-", size / MB, download_mbps(port, size), "-"])

    with ShapingProxy(upstream=("127.0.0.1", port)).run_in_thread() as proxied:
        rtt.rows.append(
            ["proxy, no shaping", 0, statistics.median(ping_pong(proxied, 200)) * 1000, "-"]
        )
        rate.rows.append(["proxy, no shaping", "-", size / MB, download_mbps(proxied, size), "-"])


def _measure_link(
    port: int,
    settings: NetBenchmark,
    rtt_ms: float,
    mbps: float | None,
    rtt: Table,
    rate: Table,
) -> None:
    proxy = ShapingProxy(upstream=("127.0.0.1", port), rtt_ms=rtt_ms, mbps=mbps)
    label = proxy.describe()
    with proxy.run_in_thread() as proxied:
        if rtt_ms:
            measured = statistics.median(ping_pong(proxied, settings.ping_count(rtt_ms))) * 1000
            rtt.rows.append([label, rtt_ms, measured, measured / rtt_ms])
        if mbps:
            size = settings.transfer_size(mbps)
            measured = download_mbps(proxied, size)
            rate.rows.append([label, mbps, size / MB, measured, measured / mbps])
