"""Recording a stack's reads, planning and running prefetch jobs, acceleration layers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from samples import sample_data

from workbench.errors import ImageConfigError
from workbench.formats.config import ImageConfig
from workbench.formats.zfile import ZFileReader
from workbench.image.commit import import_raw
from workbench.image.open import open_image
from workbench.prefetch import PrefetchConfig
from workbench.prefetch.layer import (
    build_trace_layer,
    read_acceleration_trace,
    with_acceleration_layer,
)
from workbench.prefetch.runtime import (
    MAX_PREFETCH_READ,
    Job,
    Prefetcher,
    TraceRecording,
    range_jobs,
    trace_jobs,
)
from workbench.prefetch.tracefile import TraceFile, TraceRecord

MiB = 1 << 20


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image of two lz4 tar layers: 2 MiB of data, then its first MiB rewritten."""
    base = tmp_path_factory.mktemp("runtime")
    (base / "low.raw").write_bytes(sample_data(2 * MiB, 1))
    (base / "high.raw").write_bytes(sample_data(MiB, 2) + bytes(MiB))  # zeros: unmapped
    import_raw(base / "low.raw", base / "low.tar", compress="lz4", tar=True)
    import_raw(base / "high.raw", base / "high.tar", compress="lz4", tar=True)
    path = base / "config.v1.json"
    path.write_text(
        f'{{"lowers": [{{"file": "{base / "low.tar"}"}}, {{"file": "{base / "high.tar"}"}}]}}'
    )
    return path


class CountingFile:
    def __init__(self, size: int) -> None:
        self.size = size
        self.name = "counting"
        self.reads: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def pread(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.reads.append((offset, length))
        return bytes(min(length, self.size - offset))


def test_a_recording_holds_every_read_of_each_lower_by_its_index(
    config: Path, tmp_path: Path
) -> None:
    trace = tmp_path / "app.trace"
    with open_image(config) as stack:
        recording = TraceRecording(stack, trace)
        assert (tmp_path / "app.trace.lock").exists()
        stack.pread(0, 4096)  # served by the top layer (index 1)
        stack.pread(MiB + 8192, 8192)  # only the bottom layer (index 0) has it
        recording.stop()
        assert recording.stop() is None  # once
        stack.pread(0, 4096)  # not recorded any more

    assert not (tmp_path / "app.trace.lock").exists() and (tmp_path / "app.trace.ok").exists()
    records = TraceFile.load(trace).records
    assert [record.layer_index for record in records] == [1, 0]
    assert records[0].count == 4096 and records[1].count == 8192
    assert all(record.op == b"R" for record in records)


def test_deleting_the_lock_file_ends_the_recording(config: Path, tmp_path: Path) -> None:
    import trio

    trace = tmp_path / "app.trace"
    with open_image(config) as stack:
        recording = TraceRecording(stack, trace)
        stack.pread(0, 4096)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(recording.watch_lock)
                (tmp_path / "app.trace.lock").unlink()

        trio.run(main)
    assert recording.finished and len(TraceFile.load(trace)) == 1


def test_trace_jobs_read_the_compressed_bytes_below_each_zfile_once(config: Path) -> None:
    trace = TraceFile(
        [
            TraceRecord(0, 4096, 8192),
            TraceRecord(0, 4096, 8192),  # the same read again: one job
            TraceRecord(1, 4096, 4096),
            TraceRecord(7, 0, 4096),  # no such layer: skipped
        ]
    )
    with open_image(config) as stack:
        jobs = trace_jobs(stack, trace)
        bottom = stack.lowers[0].file
        assert isinstance(bottom, ZFileReader)
        assert len(jobs) == 2
        assert jobs[0] == Job(bottom.source, *bottom.stored_range(4096, 8192))
        assert jobs[1].file is stack.lowers[1].file.source


def test_range_jobs_go_to_the_layer_that_serves_each_range(config: Path) -> None:
    with open_image(config) as stack:
        jobs = range_jobs(stack, [(MiB - 4096, 8192)])  # half top layer, half bottom
        sources = {job.file for job in jobs}
        assert sources == {stack.lowers[0].file.source, stack.lowers[1].file.source}


def test_the_prefetcher_reads_every_job_in_pieces_of_at_most_a_mib() -> None:
    file = CountingFile(8 * MiB)
    jobs = [Job(file, 0, 3 * MiB + 5), Job(file, 6 * MiB, 4096)]
    prefetcher = Prefetcher(jobs, concurrency=4).start()
    assert prefetcher.wait(10)
    status = prefetcher.status()
    assert status["finished"] and status["done"] == 5 and status["failed"] == 0
    assert status["bytes"] == 3 * MiB + 5 + 4096
    assert max(length for _, length in file.reads) == MAX_PREFETCH_READ
    assert sorted(file.reads)[:4] == [(0, MiB), (MiB, MiB), (2 * MiB, MiB), (3 * MiB, 5)]


def test_a_failing_read_is_counted_and_the_rest_go_on() -> None:
    class Failing(CountingFile):
        def pread(self, offset: int, length: int) -> bytes:
            if offset == 0:
                raise OSError("registry gone")
            return super().pread(offset, length)

    file = Failing(MiB)
    prefetcher = Prefetcher([Job(file, 0, 4096), Job(file, 8192, 4096)], concurrency=1).start()
    assert prefetcher.wait(10)
    assert prefetcher.status()["failed"] == 1 and prefetcher.status()["done"] == 1


def test_an_acceleration_layer_carries_the_trace_and_the_config_leaves_it_out(
    config: Path, tmp_path: Path
) -> None:
    trace = tmp_path / "app.trace"
    TraceFile([TraceRecord(0, 4096, 4096)]).dump(trace)
    build_trace_layer(trace, tmp_path / "accel.tar")
    accelerated = with_acceleration_layer(ImageConfig.load(config), tmp_path / "accel.tar")
    accelerated.dump(tmp_path / "accel.json")

    loaded = ImageConfig.load(tmp_path / "accel.json")
    assert loaded.acceleration_layer and len(loaded.lowers) == 3
    assert read_acceleration_trace(loaded).records == [TraceRecord(0, 4096, 4096)]
    with open_image(loaded) as stack:
        assert len(stack.lowers) == 2
    with pytest.raises(ImageConfigError, match="already has an acceleration layer"):
        with_acceleration_layer(loaded, tmp_path / "accel.tar")


def test_auto_mode_is_decided_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "app.trace"
    assert PrefetchConfig(str(path)).resolved().mode == "record"
    TraceFile([TraceRecord(0, 0, 512)]).dump(path)
    assert PrefetchConfig(str(path)).resolved().mode == "replay"
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        PrefetchConfig(str(path), concurrency=0)


def test_coalescing_joins_adjacent_reads_of_one_file_in_order_up_to_the_limit() -> None:
    from workbench.prefetch.runtime import coalesce

    one, two = CountingFile(8 * MiB), CountingFile(8 * MiB)
    jobs = [
        Job(one, 0, 4096),
        Job(one, 4096, 4096),  # adjacent: joined
        Job(one, 2048, 8192),  # overlapping: joined
        Job(two, 12288, 4096),  # another file: kept apart
        Job(one, 12288, 4096),
        Job(one, 65536, MiB),  # a gap: kept apart
        Job(one, 65536 + MiB, 4096),  # would pass the 1 MiB limit: kept apart
    ]
    assert coalesce(jobs) == [
        Job(one, 0, 10240),
        Job(two, 12288, 4096),
        Job(one, 12288, 4096),
        Job(one, 65536, MiB),
        Job(one, 65536 + MiB, 4096),
    ]
