"""The shaping proxy: latency and rate it adds, data it must not change, and how it ends.

Timing tests assert lower bounds (the proxy must add at least what it is set to) and only
loose upper bounds: a shared 2-core machine can always be slower, never faster.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio

from workbench.bench.net import (
    DOWNLOAD,
    ECHO,
    RESET,
    connect,
    download_mbps,
    loopback_server,
    ping_pong,
)
from workbench.net.shape import PRESETS, ShapingProxy, TokenBucket


@pytest.fixture
def upstream_port():
    with loopback_server() as port:
        yield port


def proxy_to(port: int, **settings) -> ShapingProxy:
    return ShapingProxy(upstream=("127.0.0.1", port), **settings)


def echo_through(port: int, data: bytes) -> bytes:
    """Send `data` while receiving its echo (both directions busy at once), then half-close."""
    with connect(port, ECHO) as sock:
        sender = threading.Thread(target=_send_then_eof, args=(sock, data))
        sender.start()
        received = bytearray()
        while part := sock.recv(1 << 16):
            received += part
        sender.join()
    return bytes(received)


def _send_then_eof(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


# ---------------------------------------------------------------------------------------------
# Latency and rate


def test_round_trip_time_is_added_once_per_request_and_response(upstream_port: int) -> None:
    with proxy_to(upstream_port, rtt_ms=20).run_in_thread() as port:
        times = ping_pong(port, 15)

    assert min(times) >= 0.019
    assert statistics.median(times) < 0.060


def test_delay_does_not_limit_throughput(upstream_port: int) -> None:
    # 8 MB behind 100 ms of RTT: a stop-and-wait delay would take seconds per window.
    with proxy_to(upstream_port, rtt_ms=100).run_in_thread() as port:
        start = time.perf_counter()
        rate = download_mbps(port, 8_000_000)
        elapsed = time.perf_counter() - start

    assert rate > 200
    assert elapsed < 3


def test_rate_cap_paces_a_download(upstream_port: int) -> None:
    size = 5_000_000
    with proxy_to(upstream_port, mbps=50).run_in_thread() as port:
        start = time.perf_counter()
        rate = download_mbps(port, size)
        elapsed = time.perf_counter() - start

    expected = size * 8 / 50e6
    assert elapsed >= 0.9 * expected
    assert rate == pytest.approx(50, rel=0.5)


def test_rate_cap_paces_an_upload(upstream_port: int) -> None:
    size = 2_500_000
    data = os.urandom(size)
    with proxy_to(upstream_port, mbps=20, burst_bytes=64 << 10).run_in_thread() as port:
        start = time.perf_counter()
        echoed = echo_through(port, data)
        elapsed = time.perf_counter() - start

    assert echoed == data
    assert elapsed >= 0.9 * size * 8 / 20e6


def test_connections_share_the_link_by_default(upstream_port: int) -> None:
    size = 1_500_000

    def download_time(port: int) -> float:
        start = time.perf_counter()
        download_mbps(port, size)
        return time.perf_counter() - start

    with proxy_to(upstream_port, mbps=40).run_in_thread() as port, ThreadPoolExecutor(4) as pool:
        start = time.perf_counter()
        list(pool.map(download_time, [port] * 4))
        shared = time.perf_counter() - start

    # Four flows on one 40 Mbit/s link: together no faster than one flow with all of it.
    assert shared >= 0.9 * 4 * size * 8 / 40e6


def test_per_connection_rates_when_not_shared(upstream_port: int) -> None:
    size = 1_500_000
    with (
        proxy_to(upstream_port, mbps=40, shared=False).run_in_thread() as port,
        ThreadPoolExecutor(4) as pool,
    ):
        start = time.perf_counter()
        rates = list(pool.map(download_mbps, [port] * 4, [size] * 4))
        elapsed = time.perf_counter() - start

    assert elapsed >= 0.9 * size * 8 / 40e6
    assert all(rate < 40 * 1.2 for rate in rates)
    assert elapsed < 0.9 * 4 * size * 8 / 40e6  # clearly faster than one shared link


def test_token_bucket_serves_reservations_in_turn() -> None:
    bucket = TokenBucket(rate_bytes_per_s=1000, burst_bytes=500, now=0.0)

    assert bucket.reserve(500, now=0.0) == 0.0
    assert bucket.reserve(250, now=0.0) == pytest.approx(0.25)
    assert bucket.reserve(250, now=0.0) == pytest.approx(0.5)
    assert bucket.reserve(100, now=10.0) == 10.0  # refilled, but only up to the burst


def test_presets_follow_the_paper() -> None:
    assert PRESETS["datacenter"].mbps == 10_000
    assert PRESETS["datacenter"].rtt_ms < 1
    assert PRESETS["cloud-vm"].mbps == 1_500
    assert PRESETS["cross-region"].mbps == 25
    proxy = ShapingProxy.from_preset("cross-region", upstream=("127.0.0.1", 1))
    assert (proxy.rtt_ms, proxy.mbps) == (PRESETS["cross-region"].rtt_ms, 25)

    with pytest.raises(ValueError, match="unknown link preset 'lan'; choose one of datacenter"):
        ShapingProxy.from_preset("lan")
    with pytest.raises(ValueError, match="rtt_ms must be >= 0"):
        ShapingProxy(rtt_ms=-1)


# ---------------------------------------------------------------------------------------------
# Data integrity


def test_random_bytes_cross_both_ways_unchanged(upstream_port: int) -> None:
    data = os.urandom(8 << 20)
    with proxy_to(upstream_port, rtt_ms=2, mbps=2000).run_in_thread() as port:
        assert echo_through(port, data) == data


def test_many_concurrent_connections_keep_their_own_data(upstream_port: int) -> None:
    payloads = [os.urandom(256 << 10) for _ in range(32)]
    proxy = proxy_to(upstream_port, rtt_ms=5, mbps=500)
    with proxy.run_in_thread() as port, ThreadPoolExecutor(32) as pool:
        echoed = list(pool.map(echo_through, [port] * 32, payloads))

    assert echoed == payloads
    counters = proxy.statistics()
    assert counters.accepted == 32
    assert counters.active == 0
    assert counters.bytes_down == 32 * (256 << 10)
    assert counters.bytes_up == 32 * (1 + (256 << 10))  # and the mode byte of each


def test_large_download_arrives_whole(upstream_port: int) -> None:
    size = 40_000_000
    with (
        proxy_to(upstream_port, rtt_ms=1).run_in_thread() as port,
        connect(port, DOWNLOAD + struct.pack(">Q", size)) as sock,
    ):
        received = bytearray()
        while part := sock.recv(1 << 20):
            received += part

    pattern = bytes(range(256))
    assert len(received) == size
    assert received[:256] == pattern and received[-256:] == pattern


# ---------------------------------------------------------------------------------------------
# End of stream, errors, shutdown


def test_half_close_reaches_the_other_side_after_the_data(upstream_port: int) -> None:
    with proxy_to(upstream_port, rtt_ms=10).run_in_thread() as port, connect(port, ECHO) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)  # the echo server answers EOF with EOF
        sock.settimeout(2)
        received = b""
        while part := sock.recv(100):
            received += part

    assert received == b"last words"


def test_client_may_keep_reading_after_it_half_closed(upstream_port: int) -> None:
    size = 300_000
    with (
        proxy_to(upstream_port, rtt_ms=4).run_in_thread() as port,
        connect(port, DOWNLOAD + struct.pack(">Q", size)) as sock,
    ):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(2)
        received = 0
        while part := sock.recv(1 << 16):
            received += len(part)

    assert received == size


def test_upstream_reset_resets_the_client(upstream_port: int) -> None:
    with proxy_to(upstream_port, rtt_ms=2).run_in_thread() as port, connect(port, RESET) as sock:
        sock.sendall(b"x")
        sock.settimeout(2)
        with pytest.raises(ConnectionResetError):
            sock.recv(10)


def test_upstream_down_closes_the_client_promptly_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]  # bound, never listening: refuses

    caplog.set_level(logging.WARNING, logger="workbench.net.shape")
    with (
        proxy_to(dead_port, rtt_ms=10).run_in_thread() as port,
        socket.create_connection(("127.0.0.1", port)) as sock,
    ):
        sock.settimeout(2)
        start = time.perf_counter()
        try:
            closed = sock.recv(10) == b""
        except ConnectionResetError:
            closed = True
        elapsed = time.perf_counter() - start

    assert closed
    assert elapsed < 1
    assert f"upstream 127.0.0.1:{dead_port} unreachable" in caplog.text


def test_stopping_leaves_no_threads_or_sockets(upstream_port: int) -> None:
    threads_before = set(threading.enumerate())
    fds_before = set(os.listdir("/proc/self/fd"))

    with proxy_to(upstream_port, rtt_ms=50, mbps=10).run_in_thread() as port:
        # A connection in the middle of a transfer when the proxy stops.
        busy = connect(port, DOWNLOAD + struct.pack(">Q", 10_000_000))
        busy.recv(100)

    with busy:
        busy.settimeout(2)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        try:
            while busy.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass  # closed either way; no hang is what matters

    time.sleep(0.05)
    assert set(threading.enumerate()) - threads_before == set()
    assert set(os.listdir("/proc/self/fd")) - fds_before == set()


def test_serve_reports_its_port_in_a_nursery(upstream_port: int) -> None:
    async def main() -> bytes:
        proxy = proxy_to(upstream_port, rtt_ms=4)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(ECHO + b"ping")
                await stream.send_eof()
                answer = b""
                while part := await stream.receive_some():
                    answer += part
            nursery.cancel_scope.cancel()
        return answer

    assert trio.run(main) == b"ping"


def test_binding_a_busy_port_fails_in_the_caller(upstream_port: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proxy = ShapingProxy(listen=taken.getsockname(), upstream=("127.0.0.1", upstream_port))
        with pytest.raises(OSError, match="in use"), proxy.run_in_thread():
            pass
