"""Ready probes against real processes: a log line, a local HTTP server, an exit, timeouts."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from workbench.datasets.probes import ExitProbe, HttpProbe, LineProbe, drain, from_spec
from workbench.errors import ProbeError, ProbeTimeoutError, RecipeError


def _spawn(script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["/bin/sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@pytest.fixture
def stopper() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_log_line_seen_in_merged_output(stopper: list[subprocess.Popen[bytes]]) -> None:
    process = _spawn(
        "echo starting; sleep 0.2; echo '1:M * Ready to accept connections' >&2; sleep 30"
    )
    stopper.append(process)
    probe = LineProbe.log("Ready to accept connections")

    before = time.monotonic()
    result = probe.wait(process.stdout, time.monotonic() + 20)

    assert result.evidence == "1:M * Ready to accept connections"
    assert result.ready_at >= before
    assert process.poll() is None


def test_log_line_without_newline_is_seen(stopper: list[subprocess.Popen[bytes]]) -> None:
    process = _spawn("printf 'database system is ready to accept connections'; sleep 30")
    stopper.append(process)
    result = LineProbe.log("ready to accept").wait(process.stdout, time.monotonic() + 20)
    assert "ready to accept" in result.evidence


def test_output_regex(stopper: list[subprocess.Popen[bytes]]) -> None:
    process = _spawn("echo 'numpy 2.2.6 pandas 2.3.2 imported in 0.512 s; sum 45'")
    stopper.append(process)
    probe = LineProbe.output(r"^numpy \S+ pandas \S+ imported in [0-9.]+ s")
    result = probe.wait(process.stdout, time.monotonic() + 20)
    assert probe.kind == "output"
    assert result.evidence.startswith("numpy 2.2.6")


def test_log_times_out_with_last_output(stopper: list[subprocess.Popen[bytes]]) -> None:
    process = _spawn("echo still loading; sleep 30")
    stopper.append(process)
    with pytest.raises(ProbeTimeoutError, match="still loading"):
        LineProbe.log("Ready").wait(process.stdout, time.monotonic() + 0.5)


def test_log_fails_when_output_ends(stopper: list[subprocess.Popen[bytes]]) -> None:
    process = _spawn("echo fatal: no config; exit 3")
    stopper.append(process)
    with pytest.raises(ProbeError, match=r"output ended.*fatal: no config"):
        LineProbe.log("Ready").wait(process.stdout, time.monotonic() + 20)


def test_drain_keeps_to_its_own_stream() -> None:
    """A drained stream closed by its owner: a new pipe that reuses the number is not read.

    Without its own descriptor the drain thread read the next pipe given that number and
    stole its lines (13 of 20 rounds here).
    """
    for _ in range(10):
        first = subprocess.Popen(
            ["/bin/sh", "-c", "while :; do echo noise; sleep 0.01; done"], stdout=subprocess.PIPE
        )
        drain(first.stdout)
        time.sleep(0.05)
        first.stdout.close()
        second = subprocess.Popen(
            ["/bin/sh", "-c", "sleep 0.1; echo mine; sleep 30"], stdout=subprocess.PIPE
        )
        try:
            result = LineProbe.log("mine").wait(second.stdout, time.monotonic() + 5)
            assert result.evidence == "mine"
        finally:
            for process in (first, second):
                process.kill()
                process.wait()
            second.stdout.close()


def test_log_file_followed(tmp_path, stopper: list[subprocess.Popen[bytes]]) -> None:
    log = tmp_path / "server.log"
    process = _spawn(
        f"sleep 0.2; echo booting > {log}; sleep 0.2; echo ready now >> {log}; sleep 30"
    )
    stopper.append(process)
    result = LineProbe.log("ready now").wait(log, time.monotonic() + 20, process=process)
    assert result.evidence == "ready now"


class _Handler(http.server.BaseHTTPRequestHandler):
    ready_after = 0.0

    def do_GET(self) -> None:
        ready = time.monotonic() >= self.ready_after
        self.send_response(200 if ready and self.path == "/ok" else 503)
        self.end_headers()
        self.wfile.write(b"body")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_http_waits_for_200(server: http.server.ThreadingHTTPServer) -> None:
    _Handler.ready_after = time.monotonic() + 0.3
    port = server.server_address[1]
    result = HttpProbe("/ok", port).wait(f"127.0.0.1:{port}", time.monotonic() + 20)
    assert result.ready_at >= _Handler.ready_after
    assert "200" in result.evidence


def test_http_probe_called_makes_one_attempt(server: http.server.ThreadingHTTPServer) -> None:
    _Handler.ready_after = 0.0
    port = server.server_address[1]
    assert HttpProbe("/ok", port)(f"127.0.0.1:{port}") is True
    assert HttpProbe("/missing", port)(("127.0.0.1", port)) is False
    assert HttpProbe("/", 9)() is False  # nothing listens on the discard port


def test_http_times_out_with_last_status(server: http.server.ThreadingHTTPServer) -> None:
    _Handler.ready_after = 0.0
    port = server.server_address[1]
    with pytest.raises(ProbeTimeoutError, match="503"):
        HttpProbe("/missing", port).wait(("127.0.0.1", port), time.monotonic() + 0.5)


def test_http_refused_then_fails_when_process_exits() -> None:
    # Nothing listens on the port the process would have used; it exits first.
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    try:
        with pytest.raises(ProbeError, match="exited with code 0"):
            HttpProbe("/", 9).wait("127.0.0.1:9", time.monotonic() + 20, process=process)
    finally:
        process.wait()


def test_exit_probe_checks_code_and_output(stopper: list[subprocess.Popen[bytes]]) -> None:
    ok = _spawn("echo hello")
    stopper.append(ok)
    assert "hello" in ExitProbe(0, "hello").wait(ok, time.monotonic() + 20).evidence

    wrong = _spawn("echo hello; exit 2")
    stopper.append(wrong)
    with pytest.raises(ProbeError, match="code 2, not 0"):
        ExitProbe(0, "hello").wait(wrong, time.monotonic() + 20)

    silent = _spawn("true")
    stopper.append(silent)
    with pytest.raises(ProbeError, match="without printing 'hello'"):
        ExitProbe(0, "hello").wait(silent, time.monotonic() + 20)


def test_exit_probe_times_out(stopper: list[subprocess.Popen[bytes]]) -> None:
    process = _spawn("sleep 30")
    stopper.append(process)
    with pytest.raises(ProbeTimeoutError, match="did not exit"):
        ExitProbe().wait(process, time.monotonic() + 0.3)


def test_specs_round_trip() -> None:
    for spec in (
        {"log": "Ready to accept connections"},
        {"output": r"^numpy \S+"},
        {"http": "/wp-admin/install.php", "port": 80, "status": 200, "host": "localhost"},
        {"exit": 0, "output": "hello"},
    ):
        assert from_spec(spec, "t").to_spec() == spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "exactly one of"),
        ({"log": "a", "http": "/"}, "exactly one of"),
        ({"http": "no-slash"}, "path starting with /"),
        ({"http": "/", "port": "80"}, "integers"),
        ({"log": "a", "port": 1}, r"unknown key\(s\) \['port'\]"),
        ({"output": "("}, "bad output probe"),
        ({"exit": "0"}, "integer exit code"),
        ("Ready", "expected a table"),
    ],
)
def test_bad_specs(spec: object, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        from_spec(spec, "recipe x: workload.ready")
