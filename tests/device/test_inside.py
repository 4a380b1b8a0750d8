# ruff: noqa: F811  (the fixtures of test_mount are imported, then named as arguments)
"""Seeing inside running images: the debug view, metrics, the hang detector, trace prefetch.

Real mounts (root, /dev/fuse, losetup, mkfs.ext4; see test_mount.py, whose image and run-dir
fixtures these tests share): each starts what it needs and tears it down in a finally, and
the run-dir fixture then checks that no mount, loop device or process is left behind.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from registries import start_registry
from test_mount import image, run_dir, tree_files  # noqa: F401  (fixtures)

from workbench.device.introspect import query
from workbench.device.mount import Mount, mount_image, unmount
from workbench.formats.config import ImageConfig
from workbench.prefetch import PrefetchConfig, prefetch_status, wait_for_prefetch
from workbench.prefetch.layer import build_trace_layer, with_acceleration_layer
from workbench.prefetch.tracefile import TraceFile
from workbench.registry.image import push_image

pytestmark = pytest.mark.slow

APP_FILES = ("d1/sub/f4.bin", "d2/sub/f5.bin", "d3/sub/f3.bin", "big.bin")
"""What the 'application' reads at start in the record and replay tests."""

WAIT = 20.0
"""Seconds to wait for something that happens in another process before failing."""


def wait_until(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def scrape(mount: Mount) -> dict[tuple[str, tuple], float]:
    assert mount.metrics_port is not None
    url = f"http://127.0.0.1:{mount.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def cache_stats(mount: Mount) -> dict:
    return json.loads(query(mount.control, "cache"))


def read_files(root: Path, names: tuple[str, ...] = APP_FILES) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in names}


@contextmanager
def debug_view(target: Path, run: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`workbench debugfs TARGET` as a child process, unmounted and stopped afterwards."""
    command = [sys.executable, "-c", "from workbench.cli import main; main()"]
    process = subprocess.Popen(
        [*command, "debugfs", str(target), "--run-dir", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], WAIT)
        assert ready and process.stdout.readline().strip() == b"ready", process.stderr.read()
        yield process
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(target)], capture_output=True)
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


# The debug view --------------------------------------------------------------------------


def test_the_debug_view_shows_each_file_of_a_mounted_image_and_tail_follows_its_trace(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    config, source = image
    target, view = tmp_path / "mnt", tmp_path / "debug"
    target.mkdir()
    view.mkdir()
    mount = mount_image(config, target, run_dir=run_dir, metrics="127.0.0.1:0")
    tail = None
    try:
        with debug_view(view, run_dir):
            assert sorted(os.listdir(view)) == sorted(["README", mount.id])
            readme = (view / "README").read_text()
            folder = view / mount.id
            names = sorted(os.listdir(folder))
            for name in names:
                assert name in readme  # the README says what each file is
            assert os.listdir(folder / "layers") == ["0"]

            # cat of every file: JSON parses, CSV has its header, metrics is Prometheus text.
            files = [path for path in folder.rglob("*") if path.is_file() and path.name != "trace"]
            contents = {path.relative_to(folder).as_posix(): path.read_bytes() for path in files}
            for name, data in contents.items():
                if name.endswith(".json"):
                    json.loads(data)
            assert json.loads(contents["mount.json"])["mountpoint"] == str(target)
            header = json.loads(contents["layers/0/header.json"])
            assert header["wrapping"] == ["tar", "zfile"] and header["segments"] > 0
            index = contents["layers/0/index.csv"].decode().splitlines()
            assert index[0] == "offset,length,moffset,zeroed,tag" and len(index) > 1
            merged = contents["merged-index.csv"].decode().splitlines()
            assert merged[0].endswith(",layer") and len(merged) == len(index)
            assert b"workbench_device_requests_in_flight" in contents["metrics"]
            assert json.loads(contents["inflight.json"])["requests"] == []
            with pytest.raises(OSError):
                (folder / "README.txt").write_text("no")

            # tail -f of the trace sees the events of one read, down to the layers.
            tail = subprocess.Popen(
                ["tail", "-f", "-s", "0.2", str(folder / "trace")],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            info = lambda: json.loads((folder / "info.json").read_bytes())  # noqa: E731
            wait_until(lambda: info()["trace_followers"] == 1, "debugfs to follow the trace")
            assert (target / "d0/sub/f5.bin").read_bytes() == (
                source / "d0/sub/f5.bin"
            ).read_bytes()
            seen = b""
            deadline = time.monotonic() + WAIT
            while b"request fuse-read" not in seen and time.monotonic() < deadline:
                ready, _, _ = select.select([tail.stdout], [], [], 0.5)
                if ready:
                    seen += os.read(tail.stdout.fileno(), 65536)  # type: ignore[union-attr]
            assert b"request fuse-read" in seen and b"lsmt read" in seen and b"zfile block" in seen
            tail.kill()
            tail.communicate()
            wait_until(lambda: info()["trace_followers"] == 0, "tracing to be switched off")
    finally:
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.communicate()
        unmount(target, run_dir)


# Metrics and the hang detector --------------------------------------------------------------


def test_prometheus_metrics_count_the_reads_their_bytes_and_latency(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    config, source = image
    target = tmp_path / "mnt"
    target.mkdir()
    mount = mount_image(config, target, run_dir=run_dir, metrics="127.0.0.1:0")
    try:
        before = scrape(mount)
        assert read_files(target) == read_files(source)
        after = scrape(mount)
    finally:
        unmount(target, run_dir)

    read = (("op", "read"),)
    requests = after[("workbench_device_requests_total", read)]
    assert requests > before.get(("workbench_device_requests_total", read), 0)
    assert after[("workbench_device_bytes_total", read)] >= sum(
        len(data) for data in read_files(source).values()
    )
    assert after[("workbench_device_request_seconds_count", read)] == requests
    assert after[("workbench_device_request_seconds_bucket", (("le", "+Inf"), *read))] == requests
    assert not any(name == "workbench_device_errors_total" for name, _ in after)
    assert after[("workbench_device_requests_hung", ())] == 0


def test_a_stalled_registry_fires_the_hang_detector(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry.faults import FaultServer

    config, source = image
    blob = (config.parent / "layer.tar").read_bytes()
    target = tmp_path / "mnt"
    target.mkdir()
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache"))
    with FaultServer(blob, "tests/stall") as server:
        remote = tmp_path / "remote.json"
        remote.write_text(
            json.dumps(
                {
                    "repoBlobUrl": f"{server.url}/v2/tests/stall/blobs",
                    "lowers": [{"digest": server.digest, "size": len(blob)}],
                }
            )
        )
        mount = mount_image(remote, target, run_dir=run_dir, metrics="0", hang_threshold=0.3)
        reader = None
        try:
            server.faults.extend(["delay:3"] * 4)  # the next fetches answer after 3 s
            copy = open(tmp_path / "big.copy", "wb")  # noqa: SIM115  (closed by communicate)
            reader = subprocess.Popen(["cat", str(target / "big.bin")], stdout=copy)
            copy.close()
            stalled = wait_until(
                lambda: [
                    request
                    for request in json.loads(query(mount.control, "inflight"))["requests"]
                    if request["hung"]
                ],
                "a request to count as hung",
            )
            assert stalled[0]["op"] == "read" and stalled[0]["age_s"] >= 0.3
            metrics = scrape(mount)
            assert metrics[("workbench_device_requests_hung", ())] >= 1
            assert metrics[("workbench_device_hangs_total", ())] >= 1

            reader.communicate(timeout=60)  # the stall ends: the read completes
            assert reader.returncode == 0
            assert (tmp_path / "big.copy").read_bytes() == (source / "big.bin").read_bytes()
            assert scrape(mount)[("workbench_device_requests_hung", ())] == 0
        finally:
            if reader is not None and reader.poll() is None:
                reader.kill()
                reader.communicate()
            server.faults.clear()
            unmount(target, run_dir)
    log = (run_dir / "mounts").glob("*.log")
    assert not list(log)  # the mount's log went with it


# Trace-based prefetch ---------------------------------------------------------------------


def test_a_recorded_start_replays_into_the_cache_before_the_app_reads(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, source = image
    target, trace = tmp_path / "mnt", tmp_path / "app.trace"
    target.mkdir()
    expected = read_files(source)

    with start_registry("embedded", tmp_path) as url:
        reference = f"{url.split('://', 1)[1]}/tests/tree:v1"
        push_image(config, reference)

        # Record: a cold, lazy start of the "application".
        monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache-record"))
        mount = mount_image(reference, target, run_dir=run_dir, prefetch=PrefetchConfig(str(trace)))
        try:
            assert mount.prefetch is not None and mount.prefetch["mode"] == "record"
            assert read_files(target) == expected
            assert prefetch_status(mount)["records"] > 0
        finally:
            unmount(target, run_dir)
        recorded = TraceFile.load(trace)
        assert len(recorded) > 0 and Path(f"{trace}.ok").exists()
        assert {record.layer_index for record in recorded.records} == {0}

        # Replay into an empty cache; the app's reads then find every block present.
        monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache-replay"))
        mount = mount_image(reference, target, run_dir=run_dir, prefetch=PrefetchConfig(str(trace)))
        try:
            assert mount.prefetch is not None and mount.prefetch["mode"] == "replay"
            status = wait_for_prefetch(mount)
            assert status is not None and status["finished"] and status["failed"] == 0
            assert status["done"] > 0 and status["bytes"] > 0
            warmed = cache_stats(mount)
            assert warmed["bytes_fetched"] > 0 and warmed["present_bytes"] > 0
            (blob,) = warmed["blobs"]
            presence = query(mount.control, "presence", key=blob["key"]).decode()
            assert "#" in presence

            assert read_files(target) == expected
            after = cache_stats(mount)
            assert after["fetches"] == warmed["fetches"]  # nothing left to fetch
            assert after["hits"] > warmed["hits"]
        finally:
            unmount(target, run_dir)

        # Cold again without replay: the same reads fetch (what replay saved above).
        monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache-cold"))
        mount = mount_image(reference, target, run_dir=run_dir)
        try:
            before = cache_stats(mount)
            assert read_files(target) == expected
            assert cache_stats(mount)["fetches"] > before["fetches"]
        finally:
            unmount(target, run_dir)

        # Build time: the trace as an acceleration layer on top of the image.
        build_trace_layer(trace, tmp_path / "accel.tar")
        accelerated = with_acceleration_layer(ImageConfig.load(config), tmp_path / "accel.tar")
        accelerated.dump(tmp_path / "accel.json")
        push_image(tmp_path / "accel.json", f"{reference}-accel")
        monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache-accel"))
        mount = mount_image(f"{reference}-accel", target, run_dir=run_dir)
        try:
            status = wait_for_prefetch(mount)
            assert status is not None and status["source"] == "acceleration layer"
            assert status["finished"] and status["done"] > 0
            warmed = cache_stats(mount)
            assert read_files(target) == expected
            assert cache_stats(mount)["fetches"] == warmed["fetches"]
        finally:
            unmount(target, run_dir)


def test_a_priority_list_prefetches_the_listed_files(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, source = image
    target, listing = tmp_path / "mnt", tmp_path / "priority.list"
    target.mkdir()
    listing.write_text("# the files the app opens first\n/big.bin\n/d3/sub/\n")
    names = ("big.bin", *(f"d3/sub/f{number}.bin" for number in range(6)))

    with start_registry("embedded", tmp_path) as url:
        reference = f"{url.split('://', 1)[1]}/tests/tree:v1"
        push_image(config, reference)
        monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache"))
        mount = mount_image(
            reference, target, run_dir=run_dir, prefetch=PrefetchConfig.priority_list(listing)
        )
        try:
            status = wait_for_prefetch(mount)
            assert status is not None and status["mode"] == "list" and status["finished"]
            assert status["bytes"] >= len((source / "big.bin").read_bytes()) // 2  # compressed
            warmed = cache_stats(mount)
            assert read_files(target, names) == read_files(source, names)
            # Only what the kernel reads around the files (readahead, metadata) is left to
            # fetch: far less than the listed data the prefetch brought in.
            fetched_by_app = cache_stats(mount)["bytes_fetched"] - warmed["bytes_fetched"]
            assert fetched_by_app < status["bytes"] / 2
        finally:
            unmount(target, run_dir)


def test_recording_an_image_with_an_acceleration_layer_is_refused(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    from workbench.device.mount import MountError

    config, _source = image
    trace = tmp_path / "app.trace"
    TraceFile().dump(trace)
    build_trace_layer(trace, tmp_path / "accel.tar")
    with_acceleration_layer(ImageConfig.load(config), tmp_path / "accel.tar").dump(
        tmp_path / "accel.json"
    )
    target = tmp_path / "mnt"
    target.mkdir()
    with pytest.raises(MountError, match="recording another is refused"):
        mount_image(
            tmp_path / "accel.json",
            target,
            run_dir=run_dir,
            prefetch=PrefetchConfig.record(tmp_path / "new.trace"),
        )


def test_a_damaged_trace_fails_the_mount_and_leaves_nothing_behind(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    from workbench.device.mount import MountError, list_mounts

    config, _source = image
    trace = tmp_path / "app.trace"
    TraceFile([]).dump(trace)
    trace.write_bytes(trace.read_bytes() + b"x")  # data_size no longer matches
    target = tmp_path / "mnt"
    target.mkdir()
    with pytest.raises(MountError, match="did not start"):
        mount_image(config, target, run_dir=run_dir, prefetch=PrefetchConfig.replay(trace))
    assert list_mounts(run_dir) == []
    assert not os.path.ismount(target)
