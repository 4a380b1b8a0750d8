"""Ready probes: when a started workload counts as ready, observed from outside it.

A probe watches something the caller already has (the workload's output stream, its TCP
address, its process) and returns when the workload is ready, with the time it saw that and
the evidence:

    wl = workload("redis")
    process = subprocess.Popen(..., stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    result = wl.probe.wait(process.stdout, time.monotonic() + wl.timeout)  # kind "log"
    result = wl.probe.wait("127.0.0.1:80", deadline)                       # kind "http"
    result = wl.probe.wait(process, deadline)                              # kind "exit"
    result.ready_at, result.evidence       # time.monotonic() seconds, e.g. the log line

The kinds (`Probe.kind`), and what the caller passes to `wait`:
- ``"log"`` (`LineProbe`): a line of the output contains a text (redis "Ready to accept
  connections"). Pass the stream (a file object or fd, stdout and stderr merged) or the path
  of a log file (followed like ``tail -f``).
- ``"output"`` (`LineProbe`): a line of the output matches a regular expression (the python
  workload prints its import versions and time). Same target as "log".
- ``"http"`` (`HttpProbe`): ``GET path`` on the workload's port answers the expected status,
  polled every 10 ms as HelloBench does. Pass ``"host:port"``, ``(host, port)``, or None for
  127.0.0.1 and the probe's port; ``netns=`` names a network namespace file
  (``/proc/PID/ns/net``) to connect from, for a workload in its own network namespace.
  Calling the probe (``probe()``, same arguments) makes one attempt and returns a bool, for
  callers that poll on their own.
- ``"exit"`` (`ExitProbe`): the process exits with the expected code and, optionally, its
  output contains a text (debian's ``echo hello``). Pass the `subprocess.Popen`.

`deadline` is an absolute `time.monotonic()` value. A probe raises `ProbeTimeoutError` at the
deadline, and `ProbeError` as soon as readiness has become impossible (the stream ended, the
process exited, or exited with another code); both messages carry the last evidence seen
(last lines of output, last HTTP answer). `LineProbe` and `HttpProbe` also take
``process=``: they then fail early when that process exits.

Caveats:
- a line probe reads the stream's file descriptor directly (`os.read`, not the file object's
  buffer): do not read the stream elsewhere while it waits. After it returns, keep reading
  (`drain`) or the workload blocks once the pipe is full;
- lines are decoded as UTF-8 with replacement; a pattern is also tried against an unfinished
  last line, so a ready text printed without a newline is seen;
- `HttpProbe` speaks just enough HTTP/1.1 to read the status line (no TLS, no redirects
  followed: a 302 is not a 200);
- ``netns=`` needs root (setns(2) in a short-lived thread, so the caller's own threads keep
  their network namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

from workbench.errors import ProbeError, ProbeTimeoutError, RecipeError

__all__ = [
    "ExitProbe",
    "HttpProbe",
    "LineProbe",
    "Probe",
    "ReadyResult",
    "drain",
    "from_spec",
]

POLL_INTERVAL_S = 0.01
"""Between two HTTP attempts and two reads of a followed log file (HelloBench polls at 10 ms)."""

TAIL_LINES = 5
"""Lines of output kept for error messages."""

_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class ReadyResult:
    """When the probe saw the workload ready (`time.monotonic()` seconds) and what it saw."""

    ready_at: float
    evidence: str


class Probe:
    """Base of the probes: `kind`, `describe()` and `wait(target, deadline)`."""

    kind: ClassVar[str] = ""

    def describe(self) -> str:
        raise NotImplementedError

    def wait(self, target: Any, deadline: float, **kw: Any) -> ReadyResult:
        raise NotImplementedError

    def to_spec(self) -> dict[str, Any]:
        """The recipe table this probe was made from (for image labels and JSON output)."""
        raise NotImplementedError


# Lines of output


@dataclass(frozen=True)
class LineProbe(Probe):
    """Ready when a line of output matches `pattern` (a regular expression).

    `kind` is "log" (made from a plain text, escaped) or "output" (made from a regex).
    """

    pattern: str
    line_kind: str = "log"

    def __post_init__(self) -> None:
        re.compile(self.pattern)

    @classmethod
    def log(cls, text: str) -> LineProbe:
        return cls(re.escape(text), "log")

    @classmethod
    def output(cls, pattern: str) -> LineProbe:
        return cls(pattern, "output")

    @property
    def kind(self) -> str:  # type: ignore[override]
        """ "log" or "output"."""
        return self.line_kind

    def describe(self) -> str:
        return f"a line of output matching {self.pattern!r}"

    def to_spec(self) -> dict[str, Any]:
        if self.line_kind == "log":
            return {"log": _unescape(self.pattern)}
        return {"output": self.pattern}

    def wait(
        self,
        target: IO[bytes] | int | str | os.PathLike[str],
        deadline: float,
        *,
        process: subprocess.Popen[bytes] | None = None,
    ) -> ReadyResult:
        """Read `target` (a stream or fd; or a log file path) until a line matches."""
        matcher = re.compile(self.pattern)
        if isinstance(target, str | os.PathLike):
            return self._follow_file(Path(target), matcher, deadline, process)

        fd = target if isinstance(target, int) else target.fileno()
        reader = _LineReader()
        while True:
            line = reader.match(matcher)
            if line is not None:
                return ReadyResult(time.monotonic(), line)
            chunk = _next_chunk(fd, deadline, f"no line matched {self.pattern!r}", reader)
            if chunk is None:
                _check_alive(process, self, reader.tail())
                continue
            if not chunk:
                line = reader.finish(matcher)
                if line is not None:
                    return ReadyResult(time.monotonic(), line)
                raise ProbeError(
                    f"the output ended before a line matched {self.pattern!r} (the workload "
                    f"exited or closed it); last output: {reader.tail()}"
                )
            reader.feed(chunk)

    def _follow_file(
        self,
        path: Path,
        matcher: re.Pattern[str],
        deadline: float,
        process: subprocess.Popen[bytes] | None,
    ) -> ReadyResult:
        reader = _LineReader()
        offset = 0
        while True:
            with contextlib.suppress(FileNotFoundError), path.open("rb") as file:
                file.seek(offset)
                chunk = file.read()
                offset += len(chunk)
                reader.feed(chunk)
            line = reader.match(matcher)
            if line is not None:
                return ReadyResult(time.monotonic(), line)
            if time.monotonic() >= deadline:
                raise ProbeTimeoutError(
                    f"not ready by the deadline: no line of {path} matched {self.pattern!r}; "
                    f"last lines: {reader.tail()}"
                )
            _check_alive(process, self, reader.tail())
            time.sleep(POLL_INTERVAL_S)


class _LineReader:
    """Bytes in, complete lines out; keeps the last few lines for error messages."""

    def __init__(self) -> None:
        self._pending = b""
        self._lines: deque[str] = deque()
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        *complete, self._pending = data.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self._lines.append(line)
            self._tail.append(line)

    def match(self, matcher: re.Pattern[str]) -> str | None:
        while self._lines:
            line = self._lines.popleft()
            if matcher.search(line):
                return line
        partial = self._pending.decode("utf-8", "replace")
        if partial and matcher.search(partial):
            return partial
        return None

    def finish(self, matcher: re.Pattern[str]) -> str | None:
        if self._pending:
            self.feed(b"\n")
        return self.match(matcher)

    def tail(self) -> str:
        lines = [*self._tail]
        if self._pending:
            lines.append(self._pending.decode("utf-8", "replace"))
        return " | ".join(lines[-TAIL_LINES:]) or "(none)"


def _next_chunk(fd: int, deadline: float, waiting_for: str, reader: _LineReader) -> bytes | None:
    """The next bytes of `fd` (b"" at its end), or None after half a second without any."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ProbeTimeoutError(
            f"not ready by the deadline: {waiting_for}; last output: {reader.tail()}"
        )
    readable, _, _ = select.select([fd], [], [], min(remaining, 0.5))
    return os.read(fd, 65536) if readable else None


def drain(stream: IO[bytes] | int, sink: IO[bytes] | None = None) -> threading.Thread:
    """Keep reading `stream` to its end in a daemon thread (into `sink` when given).

    The thread reads a duplicate of the file descriptor, so the caller may close the stream
    at any time: the descriptor's number can then be reused by a new pipe without the
    thread stealing that pipe's output.
    """
    fd = os.dup(stream if isinstance(stream, int) else stream.fileno())

    def run() -> None:
        try:
            while chunk := os.read(fd, 65536):
                if sink is not None:
                    sink.write(chunk)
        except OSError:
            pass
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name="workbench-drain", daemon=True)
    thread.start()
    return thread


# HTTP


@dataclass(frozen=True)
class HttpProbe(Probe):
    """Ready when ``GET path`` on `port` answers `status`."""

    path: str = "/"
    port: int = 80
    status: int = 200
    host: str = "localhost"
    kind: ClassVar[str] = "http"

    def describe(self) -> str:
        return f"GET {self.path} on port {self.port} answers {self.status}"

    def to_spec(self) -> dict[str, Any]:
        return {"http": self.path, "port": self.port, "status": self.status, "host": self.host}

    def wait(
        self,
        target: str | tuple[str, int] | None,
        deadline: float,
        *,
        netns: str | os.PathLike[str] | None = None,
        process: subprocess.Popen[bytes] | None = None,
    ) -> ReadyResult:
        """Poll until the answer's status is `status`; `target` is host:port (or None)."""
        host, port = _address(target, self.port)
        last = "no attempt made"
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise ProbeTimeoutError(
                    f"not ready by the deadline: GET http://{host}:{port}{self.path} never "
                    f"answered {self.status}; last: {last}"
                )
            try:
                status_line = self._attempt(host, port, min(1.0, deadline - now), netns)
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                parts = status_line.split(" ", 2)
                if len(parts) >= 2 and parts[1] == str(self.status):
                    return ReadyResult(
                        time.monotonic(), f"GET {self.path} on {host}:{port}: {status_line}"
                    )
                last = status_line or "empty answer"
            _check_alive(process, self, last)
            time.sleep(POLL_INTERVAL_S)

    def __call__(
        self,
        target: str | tuple[str, int] | None = None,
        *,
        netns: str | os.PathLike[str] | None = None,
    ) -> bool:
        """One attempt, for callers that poll themselves: does GET answer `status` now?"""
        host, port = _address(target, self.port)
        try:
            status_line = self._attempt(host, port, 1.0, netns)
        except OSError:
            return False
        parts = status_line.split(" ", 2)
        return len(parts) >= 2 and parts[1] == str(self.status)

    def _attempt(
        self, host: str, port: int, timeout: float, netns: str | os.PathLike[str] | None
    ) -> str:
        sock = _connect(host, port, timeout, netns)
        with sock:
            sock.settimeout(timeout)
            request = (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
                "User-Agent: workbench-probe\r\nConnection: close\r\n\r\n"
            )
            sock.sendall(request.encode("ascii"))
            answer = b""
            while b"\r\n" not in answer and len(answer) < 8192:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        return answer.split(b"\r\n", 1)[0].decode("latin-1").strip()


def _address(target: str | tuple[str, int] | None, default_port: int) -> tuple[str, int]:
    if target is None:
        return "127.0.0.1", default_port
    if isinstance(target, tuple):
        return target[0], int(target[1])
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {target!r}: expected HOST:PORT, e.g. 127.0.0.1:80")
    return host.strip("[]"), int(port)


def _connect(
    host: str, port: int, timeout: float, netns: str | os.PathLike[str] | None
) -> socket.socket:
    """A connected socket; made in network namespace `netns` when given."""
    if netns is None:
        return socket.create_connection((host, port), timeout=timeout)

    # setns(2) moves only the calling thread: make the socket in a thread of its own.
    result: list[socket.socket | BaseException] = []

    def connect_inside() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({netns}): {os.strerror(errno)}")
            finally:
                os.close(fd)
            result.append(socket.create_connection((host, port), timeout=timeout))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=connect_inside, name="workbench-netns-connect")
    thread.start()
    thread.join()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


# Exit


@dataclass(frozen=True)
class ExitProbe(Probe):
    """Ready when the process exits with `code` (and its output contains `output`, if set)."""

    code: int = 0
    output: str | None = None
    kind: ClassVar[str] = "exit"

    def describe(self) -> str:
        text = f" after printing {self.output!r}" if self.output else ""
        return f"the process exits with code {self.code}{text}"

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"exit": self.code}
        if self.output is not None:
            spec["output"] = self.output
        return spec

    def wait(self, target: subprocess.Popen[bytes], deadline: float) -> ReadyResult:
        """Wait for `target` to exit; reads its stdout (if piped) to check `output`."""
        reader = _LineReader()
        if target.stdout is not None:
            fd = target.stdout.fileno()
            while (chunk := _next_chunk(fd, deadline, "the process did not exit", reader)) != b"":
                if chunk:
                    reader.feed(chunk)
        try:
            code = target.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise ProbeTimeoutError(
                f"not ready by the deadline: the process did not exit; last output: {reader.tail()}"
            ) from None
        ready_at = time.monotonic()
        output = reader.tail()
        if code != self.code:
            raise ProbeError(f"the process exited with code {code}, not {self.code}; {output}")
        if self.output is not None and reader.finish(re.compile(re.escape(self.output))) is None:
            raise ProbeError(f"the process exited without printing {self.output!r}; {output}")
        return ReadyResult(ready_at, f"exit {code}, output: {output}")


def _check_alive(process: subprocess.Popen[bytes] | None, probe: Probe, last: str) -> None:
    if process is not None and process.poll() is not None:
        raise ProbeError(
            f"the workload exited with code {process.returncode} before {probe.describe()}; "
            f"last: {last}"
        )


# Recipe tables

_SPEC_KEYS = {
    "log": set(),
    "output": set(),
    "http": {"port", "status", "host"},
    "exit": {"output"},
}


def from_spec(spec: Any, where: str) -> Probe:
    """A probe from a recipe's ``ready`` table: exactly one of log, output, http, exit."""
    if not isinstance(spec, dict):
        raise RecipeError(f'{where}: expected a table such as {{ log = "..." }}, got {spec!r}')
    # "output" is a kind of its own, and also an option of "exit".
    kinds = [key for key in ("log", "http", "exit") if key in spec]
    if not kinds and "output" in spec:
        kinds = ["output"]
    if len(kinds) != 1:
        raise RecipeError(
            f"{where}: give exactly one of log, output, http, exit (got {sorted(spec)}); "
            'e.g. ready = { log = "Ready to accept connections" }'
        )
    kind = kinds[0]
    unknown = set(spec) - {kind} - _SPEC_KEYS[kind]
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {sorted(unknown)} for a {kind} probe; known: "
            f"{sorted(_SPEC_KEYS[kind]) or 'none'}"
        )
    try:
        return _make(kind, spec)
    except (TypeError, ValueError, re.error) as exc:
        raise RecipeError(f"{where}: bad {kind} probe {spec!r}: {exc}") from None


def _make(kind: str, spec: dict[str, Any]) -> Probe:
    value = spec[kind]
    if kind in ("log", "output"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{kind} must be a non-empty string")
        return LineProbe.log(value) if kind == "log" else LineProbe.output(value)
    if kind == "http":
        if not isinstance(value, str) or not value.startswith("/"):
            raise ValueError("http must be a path starting with /")
        port, status = spec.get("port", 80), spec.get("status", 200)
        if not isinstance(port, int) or not isinstance(status, int):
            raise ValueError("port and status must be integers")
        return HttpProbe(value, port, status, str(spec.get("host", "localhost")))
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("exit must be an integer exit code")
    output = spec.get("output")
    if output is not None and not isinstance(output, str):
        raise ValueError("output must be a string")
    return ExitProbe(value, output)


def _unescape(pattern: str) -> str:
    return re.sub(r"\\(.)", r"\1", pattern)
