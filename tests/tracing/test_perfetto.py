"""Perfetto export: Chrome trace-event JSON with one track per layer and nested slices."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from samples import sample_data

from workbench.cli.trace import trace as trace_command
from workbench.image.commit import import_raw
from workbench.image.layer import ReadOnlyLayer
from workbench.image.stack import LayerStack
from workbench.tracing import core, recording, request
from workbench.tracing.perfetto import to_perfetto

MiB = 1 << 20


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reads of a ZFile layer from four threads at once, each its own request."""
    base = tmp_path_factory.mktemp("perfetto")
    raw = base / "disk.raw"
    raw.write_bytes(sample_data(2 * MiB))
    import_raw(raw, base / "layer.zfile", compress="lz4")

    stack = LayerStack([ReadOnlyLayer.open(base / "layer.zfile")])

    def reads(seed: int) -> None:
        for number in range(8):
            offset = ((seed * 8 + number) * 37 * 4096) % (2 * MiB - 65536)
            with request("test-read", "disk", offset, 65536):
                stack.pread(offset, 65536)

    with stack, recording() as recorder:
        threads = [threading.Thread(target=reads, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    path = base / "trace.parquet"
    recorder.to_parquet(str(path))
    return path


def slices_by_track(document: dict) -> dict[int, list[dict]]:
    tracks: dict[int, list[dict]] = {}
    for event in document["traceEvents"]:
        if event["ph"] == "X":
            tracks.setdefault(event["tid"], []).append(event)
    return tracks


def test_every_event_becomes_a_complete_slice_with_its_time_and_args(trace_file: Path) -> None:
    frame = pd.read_parquet(trace_file)
    document = json.loads(json.dumps(to_perfetto(frame)))  # what a file holds

    assert document["displayTimeUnit"] == "ns"
    slices = [event for event in document["traceEvents"] if event["ph"] == "X"]
    assert len(slices) == len(frame)
    for event in slices:
        assert {"name", "ts", "dur", "pid", "tid", "args"} <= event.keys()
        assert event["ts"] >= 0 and event["dur"] >= 0
        assert event["name"].split()[0] == event["cat"]
    assert sorted(event["ts"] for event in slices) == sorted(frame.start_ns / 1e3)
    requests = [event for event in slices if event["cat"] == "request"]
    assert len(requests) == 32 and {event["args"]["length"] for event in requests} == {65536}


def test_each_track_holds_one_layer_and_its_slices_nest_or_follow(trace_file: Path) -> None:
    document = to_perfetto(pd.read_parquet(trace_file))
    names = {
        event["tid"]: event["args"]["name"]
        for event in document["traceEvents"]
        if event["ph"] == "M" and event["name"] == "thread_name"
    }
    for tid, slices in slices_by_track(document).items():
        assert {event["cat"] for event in slices} == {names[tid].split(" #")[0]}
        # A proper call stack: sorted by start (longest first), each slice lies inside the
        # innermost open one or after it has ended.
        open_ends: list[float] = []
        for event in sorted(slices, key=lambda event: (event["ts"], -event["dur"])):
            end = event["ts"] + event["dur"]
            while open_ends and open_ends[-1] <= event["ts"]:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1] + 1e-9, (names[tid], event)
            open_ends.append(end)


def test_overlapping_requests_that_do_not_nest_go_on_tracks_of_their_own() -> None:
    rows = [  # two requests overlapping in time, each with an image read inside it
        ("request", "fuse-read", 0, 100, 1),
        ("image", "read", 10, 50, 1),
        ("request", "fuse-read", 50, 100, 2),
        ("image", "read", 55, 80, 2),
        ("request", "fuse-read", 200, 10, 3),
    ]
    frame = pd.DataFrame(
        [
            (layer, op, "disk", 0, 4096, start, duration, 4096, None, request_id)
            for layer, op, start, duration, request_id in rows
        ],
        columns=list(core.EVENT_COLUMNS),
    )
    document = to_perfetto(frame)
    tracks = slices_by_track(document)
    lanes = {tid: [event["args"]["request"] for event in slices] for tid, slices in tracks.items()}
    assert sorted(lanes.values()) == [[1], [1, 3], [2], [2]]


def test_a_request_leads_by_flow_arrows_to_the_layers_it_caused(trace_file: Path) -> None:
    document = to_perfetto(pd.read_parquet(trace_file))
    starts = [event for event in document["traceEvents"] if event["ph"] == "s"]
    ends = {event["id"]: event for event in document["traceEvents"] if event["ph"] == "f"}
    assert starts and {event["id"] for event in starts} == set(ends)
    slices = [event for event in document["traceEvents"] if event["ph"] == "X"]
    for start in starts:
        source = [s for s in slices if s["tid"] == start["tid"] and s["ts"] == start["ts"]]
        assert source and source[0]["cat"] == "request"
        assert ends[start["id"]]["ts"] >= start["ts"]


def test_the_trace_command_writes_perfetto_json(trace_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    done = CliRunner().invoke(trace_command, [str(trace_file), "--perfetto", str(out)])
    assert done.exit_code == 0, done.output
    assert "ui.perfetto.dev" in done.output
    assert json.loads(out.read_text())["traceEvents"]
