"""`workbench shape`: addresses, presets, and a real run stopped with Ctrl-C."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner

from workbench.bench.net import ECHO, loopback_server
from workbench.cli.shape import parse_address, shape

RUN_SHAPE = "from workbench.cli.shape import shape; shape(prog_name='workbench shape')"


def test_addresses_take_a_port_or_host_and_port() -> None:
    assert parse_address("5001") == ("127.0.0.1", 5001)
    assert parse_address("0.0.0.0:5001") == ("0.0.0.0", 5001)
    assert parse_address("[::1]:80") == ("::1", 80)

    with pytest.raises(click.BadParameter, match="'registry' is not an address; write HOST:PORT"):
        parse_address("registry")
    with pytest.raises(click.BadParameter, match="not an address"):
        parse_address("host:70000")


def test_help_lists_the_presets() -> None:
    result = CliRunner().invoke(shape, ["--help"])

    assert result.exit_code == 0
    assert "cross-region: rtt 50 ms, 25 Mbit/s" in result.output


def test_unknown_preset_is_refused() -> None:
    result = CliRunner().invoke(shape, ["--preset", "moon", "0", "127.0.0.1:1"])

    assert result.exit_code == 2
    assert "'moon' is not one of" in result.output


def test_busy_listen_port_is_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(shape, [str(port), "127.0.0.1:1"])

    assert result.exit_code == 1
    assert re.search(rf"Error: cannot listen on {port}: .*in use", result.output)


def test_shape_runs_until_ctrl_c_with_preset_and_override() -> None:
    with loopback_server() as upstream:
        process = subprocess.Popen(
            [sys.executable, "-u", "-c", RUN_SHAPE, "--preset", "cross-region", "--rtt-ms", "20",
             "0", f"127.0.0.1:{upstream}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            banner = process.stdout.readline()
            port = int(re.search(r"shaping 127\.0\.0\.1:(\d+) ->", banner).group(1))

            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(ECHO + b"hello")
                assert sock.recv(5) == b"hello"
                start = time.perf_counter()
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
                assert time.perf_counter() - start >= 0.019
        finally:
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=10)

    assert "rtt 20 ms, 25 Mbit/s shared by all connections, preset cross-region" in banner
    assert process.returncode == 0, err
    assert "stopped: 1 connections, 7 bytes up, 6 bytes down" in out
