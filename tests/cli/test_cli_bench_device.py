"""`workbench bench device --quick`: mounts the image both ways and prints every figure.

Needs root, /dev/fuse, fio and the mount tools; skips with the reason without them unless CI
is set in the environment. Checks behaviour, not speed: every figure is printed and positive,
and no mount or loop device of the run is left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from workbench.bench.device import MissingToolError, check_requirements
from workbench.cli import cli

DEVICE_FIGURES = (
    "seq read 1 MiB",
    "rand read 4 KiB QD1",
    "rand read 4 KiB QD32",
    "du -s",
    "tar cf - | cat",
)
HANDLER_FIGURES = (
    "read_bytes 4 KiB, median",
    "read_bytes 4 KiB, p99",
    "read_bytes 128 KiB, median",
    "read_bytes 128 KiB, p99",
)


def require_device_bench() -> None:
    reason = None
    if importlib.util.find_spec("pyfuse3") is None:
        reason = "pyfuse3 is not installed (needs libfuse3-dev)"
    else:
        try:
            check_requirements()
        except MissingToolError as exc:
            reason = str(exc)
    if reason is None:
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{reason}; CI must run the device benchmark")
    pytest.skip(reason)


@pytest.mark.slow
def test_bench_device_quick_prints_every_figure_and_cleans_up(tmp_path: Path) -> None:
    require_device_bench()
    report = tmp_path / "device.json"

    result = CliRunner().invoke(
        cli,
        ["bench", "device", "--quick", "--workdir", str(tmp_path), "--json", str(report)],
    )

    assert result.exit_code == 0, result.output
    for figure in DEVICE_FIGURES + HANDLER_FIGURES:
        assert figure in result.output
    device, handler = json.loads(report.read_text())
    assert [row[0] for row in device["rows"]] == list(DEVICE_FIGURES)
    assert [row[0] for row in handler["rows"]] == list(HANDLER_FIGURES)
    for row in device["rows"] + handler["rows"]:
        _name, _unit, baseline, workbench, ratio, _target, verdict = row
        assert baseline > 0 and workbench > 0 and float(ratio) > 0, row
        assert verdict in ("met", "MISSED", "-"), row

    mounts = Path("/proc/self/mounts").read_text()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in mounts
    assert str(tmp_path) not in loops
    assert list(tmp_path.iterdir()) == [report]
