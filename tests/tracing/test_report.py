"""Reading traces back: summaries, per-request tables, request trees, the `trace` command."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from samples import sample_data

from workbench.cli.trace import trace as trace_command
from workbench.image.commit import import_raw
from workbench.image.layer import ReadOnlyLayer
from workbench.image.stack import LayerStack
from workbench.tracing import recording, request
from workbench.tracing.report import (
    render_report,
    render_request,
    request_table,
    short_target,
    summary,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two requests over a ZFile layer: one 64 KiB read, one read of an unmapped range."""
    base = tmp_path_factory.mktemp("trace")
    raw = base / "disk.raw"
    raw.write_bytes(sample_data(MiB) + bytes(MiB))
    import_raw(raw, base / "layer.zfile", compress="lz4")

    stack = LayerStack([ReadOnlyLayer.open(base / "layer.zfile")])
    with stack, recording() as recorder:
        with request("test-read", "disk", 4096, 65536):
            stack.pread(4096, 65536)
        with request("test-read", "disk", MiB + 4096, 4096):
            stack.pread(MiB + 4096, 4096)
    path = base / "trace.parquet"
    recorder.to_parquet(str(path))
    return path


def test_the_request_table_counts_what_each_request_caused(trace_file: Path) -> None:
    table = request_table(pd.read_parquet(trace_file))

    assert table.kind.tolist() == ["test-read", "test-read"]
    assert table.offset.tolist() == [4096, MiB + 4096]
    first, unmapped = table.iloc[0], table.iloc[1]
    assert first.segments >= 1 and first.blocks >= 16  # 64 KiB of 4 KiB ZFile blocks
    assert unmapped.blocks == 0  # zeros come from no layer
    assert (table.duration_us > 0).all()


def test_a_request_tree_starts_with_the_request_and_indents_each_layer(trace_file: Path) -> None:
    frame = pd.read_parquet(trace_file)
    first_id = int(request_table(frame).index[0])

    lines = render_request(frame, first_id)

    assert lines[0].startswith("request test-read disk [4096, +65536)")
    depth = {line.split()[0]: len(line) - len(line.lstrip()) for line in lines}
    assert depth["request"] < depth["image"] < depth["lsmt"] < depth["zfile"]
    with pytest.raises(KeyError, match="no events of request 999999"):
        render_request(frame, 999999)


def test_the_summary_is_ordered_from_the_request_down(trace_file: Path) -> None:
    layers = [layer for layer, _op in summary(pd.read_parquet(trace_file)).index]

    assert layers[0] == "request"
    assert layers.index("image") < layers.index("lsmt") < layers.index("zfile")


def test_the_trace_command_prints_the_report_or_one_request(trace_file: Path) -> None:
    report = CliRunner().invoke(trace_command, [str(trace_file), "--slowest", "1"])
    frame = pd.read_parquet(trace_file)
    first_id = int(request_table(frame).index[0])
    one = CliRunner().invoke(trace_command, [str(trace_file), "--request", str(first_id)])
    missing = CliRunner().invoke(trace_command, [str(trace_file), "--request", "999999"])

    assert report.exit_code == 0, report.output
    assert "requests by kind:" in report.output and "(one of the slowest)" in report.output
    assert report.output == render_report(frame, slowest=1) + "\n"
    assert one.exit_code == 0 and one.output.splitlines()[0].startswith("request test-read")
    assert missing.exit_code == 1 and "no events of request 999999" in missing.output


def test_tree_lines_shorten_digests_and_paths() -> None:
    digest = "sha256:" + "ab" * 32

    assert short_target(f"host:5000/app@{digest}") == "host:5000/app@sha256:abababababab"
    assert short_target("/var/lib/layers/layer.tar") == "layer.tar"
    assert short_target("disk") == "disk"
