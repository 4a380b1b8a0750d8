"""The tracing core: recording, request ids, exports, and the wrapper layer."""

import threading

import pandas as pd
import pytest

from workbench.blobs import BytesFile
from workbench.tracing import EVENT_COLUMNS, TracedFile, core, current_request, recording, request


def test_no_recorder_outside_a_recording():
    assert core.recorder is None

    with recording() as recorder:
        assert core.recorder is recorder

    assert core.recorder is None


def test_nested_recordings_restore_the_outer_one():
    with recording() as outer:
        with recording() as inner:
            assert core.recorder is inner
        assert core.recorder is outer


def test_traced_file_emits_one_event_per_read():
    source = TracedFile(BytesFile(b"abcdefgh", name="blob-a"), layer="blob")

    assert source.pread(2, 3) == b"cde"  # not recording: no event anywhere
    with recording() as recorder:
        assert source.pread(0, 4) == b"abcd"
        assert source.pread(6, 10) == b"gh"

    frame = recorder.to_dataframe()
    assert list(frame.columns) == list(EVENT_COLUMNS)
    assert frame["offset"].tolist() == [0, 6]
    assert frame["length"].tolist() == [4, 10]
    assert frame["nbytes"].tolist() == [4, 2]
    assert set(frame["target"]) == {"blob-a"}
    assert (frame["duration_ns"] >= 0).all()
    assert frame["hit"].isna().all()


def test_events_carry_the_id_of_their_request():
    source = TracedFile(BytesFile(bytes(100)))

    with recording() as recorder:
        source.pread(0, 1)
        with request("fuse.read") as first:
            assert current_request() == first
            source.pread(1, 1)
        with request("fuse.read") as second:
            source.pread(2, 1)

    frame = recorder.to_dataframe()
    reads = frame[frame["op"] == "read"]
    assert reads["request_id"].tolist() == [0, first, second]
    requests = frame[frame["layer"] == "request"]
    assert requests["request_id"].tolist() == [first, second]
    assert second != first
    assert current_request() == 0


def test_threads_emit_concurrently_without_losing_events():
    source = TracedFile(BytesFile(bytes(4096)))

    def reader():
        for offset in range(500):
            source.pread(offset, 8)

    with recording() as recorder:
        threads = [threading.Thread(target=reader) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert len(recorder) == 2000


def test_parquet_round_trip(tmp_path):
    source = TracedFile(BytesFile(bytes(64)))
    with recording() as recorder:
        for offset in range(0, 64, 16):
            source.pread(offset, 16)

    path = tmp_path / "trace.parquet"
    recorder.to_parquet(str(path))
    loaded = pd.read_parquet(path)

    assert loaded["offset"].tolist() == [0, 16, 32, 48]
    assert loaded["nbytes"].sum() == 64


def test_summary_groups_by_layer_and_operation():
    source = TracedFile(BytesFile(bytes(64)), layer="blob")
    with recording() as recorder:
        source.pread(0, 16)
        source.pread(16, 16)

    summary = recorder.summary()
    assert summary.loc[("blob", "read"), "events"] == 2
    assert summary.loc[("blob", "read"), "nbytes"] == 32


@pytest.mark.parametrize("hit", [True, False])
def test_hit_is_kept_as_a_nullable_boolean(hit):
    with recording() as recorder:
        recorder.emit("cache", "read", "b", 0, 1, 0, 1, hit=hit)
        recorder.emit("zfile", "read", "b", 0, 1, 0, 1)

    frame = recorder.to_dataframe()
    assert frame["hit"].iloc[0] == hit
    assert pd.isna(frame["hit"].iloc[1])


def test_traced_file_keeps_the_eviction_capability():
    evicted = []

    class Evictable(BytesFile):
        def evict(self, offset: int, length: int) -> None:
            evicted.append((offset, length))

    traced = TracedFile(Evictable(bytes(10)))
    plain = TracedFile(BytesFile(bytes(10)))

    traced.evict(2, 3)
    assert evicted == [(2, 3)]
    assert getattr(plain, "evict", None) is None
