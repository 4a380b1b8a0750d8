"""`workbench prefetch show|layer` and the prefetch options of `workbench mount`."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from click.testing import CliRunner

from workbench.cli.device import mount as mount_command
from workbench.cli.prefetch import prefetch
from workbench.prefetch.tracefile import TraceFile, TraceRecord


def test_show_lists_the_records_and_refuses_a_damaged_file(tmp_path: Path) -> None:
    trace = tmp_path / "app.trace"
    TraceFile([TraceRecord(0, 4096, 8192), TraceRecord(1, 0, 512)]).dump(trace)
    done = CliRunner().invoke(prefetch, ["show", str(trace)])
    assert done.exit_code == 0, done.output
    assert "2 reads, 8704 bytes, layers [0, 1]" in done.output
    assert "R layer   0 offset         4096 count     8192" in done.output

    trace.write_bytes(trace.read_bytes()[:-3])
    failed = CliRunner().invoke(prefetch, ["show", str(trace)])
    assert failed.exit_code != 0 and "cut short" in failed.output


def test_layer_writes_the_tar_and_a_config_with_it_on_top(tmp_path: Path) -> None:
    trace = tmp_path / "app.trace"
    TraceFile([TraceRecord(0, 4096, 8192)]).dump(trace)
    config = tmp_path / "config.v1.json"
    config.write_text(json.dumps({"lowers": [{"file": "layer.tar"}]}))
    out, out_config = tmp_path / "accel.tar", tmp_path / "sub-accel.json"
    arguments = ["layer", str(trace), str(out), "--config", str(config)]
    done = CliRunner().invoke(prefetch, [*arguments, "--out-config", str(out_config)])
    assert done.exit_code == 0, done.output

    with tarfile.open(out) as archive:
        (member,) = archive.getmembers()
        assert member.name == "trace" and member.mode == 0o444
        assert archive.extractfile(member).read() == trace.read_bytes()  # type: ignore[union-attr]
    written = json.loads(out_config.read_text())
    assert written["accelerationLayer"] is True
    assert [lower["file"] for lower in written["lowers"]] == [
        str(tmp_path / "layer.tar"),
        str(out),
    ]


def test_mount_takes_one_prefetch_mode_at_most(tmp_path: Path) -> None:
    trace = tmp_path / "app.trace"
    TraceFile().dump(trace)
    done = CliRunner().invoke(
        mount_command,
        ["cfg.json", str(tmp_path), "--replay-trace", str(trace), "--prefetch-list", str(trace)],
    )
    assert done.exit_code != 0 and "give one of --record-trace" in done.output
