"""`workbench bench snapshotter`: every figure printed, positive, and nothing left behind.

Needs root, FUSE, containerd and runc; skips with the reason without them unless CI is set.
Checks behaviour, not speed (a few calls and one start per variant).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from workbench.cli import cli
from workbench.snapshotter import peer

CALLS = (
    "empty gRPC call (Python server)",
    "Stat, snapshotter socket",
    "Mounts, snapshotter socket",
    "Stat, containerd -> overlayfs",
    "Stat, containerd -> workbench",
    "Mounts, containerd -> overlayfs",
    "Mounts, containerd -> workbench",
)


@pytest.mark.slow
def test_bench_snapshotter_prints_every_figure_and_cleans_up(tmp_path: Path) -> None:
    reason = peer.missing() or (None if os.path.exists("/dev/fuse") else "/dev/fuse is missing")
    if reason is not None:
        if os.environ.get("CI"):
            raise RuntimeError(f"{reason}; CI must run the snapshotter benchmark")
        pytest.skip(reason)
    report = tmp_path / "snapshotter.json"

    arguments = ["bench", "snapshotter", "--calls", "20", "--starts", "1"]
    arguments += ["--workdir", str(tmp_path), "--json", str(report)]
    result = CliRunner().invoke(cli, arguments)

    assert result.exit_code == 0, result.output
    grpc_table, start_table = json.loads(report.read_text())
    assert [row[0] for row in grpc_table["rows"]] == list(CALLS)
    assert all(row[1] > 0 and row[3] > 0 for row in grpc_table["rows"])
    assert len(start_table["rows"]) == 4
    assert all(row[1] > 0 and row[3] > 0 for row in start_table["rows"])
    assert list(tmp_path.iterdir()) == [report]
    with open("/proc/self/mounts") as mounts:
        assert [line for line in mounts if str(tmp_path) in line] == []
