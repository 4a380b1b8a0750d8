"""`workbench registry serve`: a real server process, seeded and read over HTTP, then stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import click
import httpx
import pytest
from click.testing import CliRunner
from registries import push_image

from workbench.cli.registry import parse_addr, registry

SERVE = "from workbench.cli.registry import registry; registry()"


def start_serving(directory: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", str(directory), "--addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first_line = process.stdout.readline()
    assert first_line.startswith("serving "), (first_line, process.stderr.read())
    return process, first_line.split(" at ")[1].strip()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_serve_until_signalled(tmp_path: Path, stop_signal: signal.Signals) -> None:
    process, url = start_serving(tmp_path / "store")
    try:
        digest = push_image(url, "lib/app", "v1", [b"layer"])
        response = httpx.get(url + "/v2/lib/app/manifests/v1")
        assert response.headers["docker-content-digest"] == digest
    finally:
        process.send_signal(stop_signal)
        assert process.wait(timeout=10) == 0
        process.stdout.close()
        process.stderr.close()
    assert (tmp_path / "store" / "repositories" / "lib" / "app" / "_tags" / "v1").is_file()


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        (":0", ("127.0.0.1", 0)),
        ("[::1]:5001", ("::1", 5001)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
    ],
)
def test_parse_addr(addr: str, expected: tuple[str, int]) -> None:
    assert parse_addr(addr) == expected


@pytest.mark.parametrize("addr", ["localhost", "127.0.0.1:http", "127.0.0.1:70000"])
def test_parse_addr_refuses_bad_addresses(addr: str) -> None:
    with pytest.raises(click.BadParameter, match="is not HOST:PORT"):
        parse_addr(addr)


def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    process, url = start_serving(tmp_path / "first")
    try:
        port = url.rsplit(":", 1)[1]
        args = ["serve", str(tmp_path / "second"), "--addr", f"127.0.0.1:{port}"]
        result = CliRunner().invoke(registry, args)
        assert result.exit_code == 1
        assert f"cannot listen on 127.0.0.1:{port}" in result.output
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()
