"""The runner for real: a tiny study on both systems, every column, resume, warm state, device.

Needs root, /dev/fuse, losetup, mount, tar and unshare (the trials mount images, overlays and
start containers); skips without them unless CI is set. Each test keeps everything (stand-in
images, registry, mounts' run folder) under its own tmp_path via WORKBENCH_EXPERIMENTS_CACHE.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.experiments.definition import load_definition, parse_definition
from workbench.experiments.runner import COLUMNS, load_table, run_experiment
from workbench.experiments.systems import convert_whiteouts

TOOLS = ("losetup", "mount", "tar", "unshare", "chroot", "mkfs.ext4", "fusermount3", "fio")


def require_root_tools() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "experiment trials need root"
    elif not os.path.exists("/dev/fuse"):
        reason = "/dev/fuse is missing"
    elif missing := [tool for tool in TOOLS if shutil.which(tool) is None]:
        reason = f"{', '.join(missing)} missing; run scripts/setup.sh"
    elif not os.path.exists("/bin/busybox"):
        reason = "/bin/busybox missing; apt-get install busybox-static"
    if reason is None:
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{reason}; CI must run the experiment tests")
    pytest.skip(reason)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    require_root_tools()
    monkeypatch.setenv("WORKBENCH_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    yield tmp_path
    with open("/proc/self/mounts") as mounts:
        leaked = [line for line in mounts if str(tmp_path) in line]
    assert not leaked, f"mounts left behind: {leaked}"


def tiny(**changes: object) -> object:
    document = {
        "name": "tiny",
        "workloads": ["standin-busybox"],
        "systems": ["tgz-overlayfs", "lazy"],
        "networks": ["none"],
        "repetitions": 1,
        "trace": True,
        **changes,
    }
    return parse_definition(document, "tiny.toml")


@pytest.mark.slow
def test_a_tiny_study_runs_both_systems_into_every_column(scratch: Path) -> None:
    result = run_experiment(tiny(), scratch / "out", progress=False)

    table = load_table(scratch / "out")
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == 2 and set(table["status"]) == {"ok"}, table["error"].tolist()
    assert result.ran == 2 and result.skipped == 0
    for row in table.itertuples():
        assert row.pull_s > 0 and row.launch_s > 0
        assert row.ready_s == pytest.approx(row.pull_s + row.launch_s)
        assert row.registry_requests >= 2 and row.registry_bytes > 0
        assert row.proxy_bytes_down >= row.registry_bytes
        assert row.launcher == "unshare+chroot" and row.workload_source == "standin"
        assert row.kernel == os.uname().release and row.cpus >= 1 and row.git_commit
    tgz = table[table.system == "tgz-overlayfs"].iloc[0]
    lazy = table[table.system == "lazy"].iloc[0]
    assert tgz.layer_bytes == tgz.registry_bytes  # the whole .tar.gz, once
    assert lazy.cache_bytes_before == 0 and lazy.cache_bytes_after > 0
    assert lazy.cache_misses > 0 and lazy.cache_hits >= 0
    assert lazy.device_read_bytes > 0
    assert 0 < lazy.resolve_s + lazy.mount_s <= lazy.pull_s
    assert (scratch / "out" / "run.json").exists()


@pytest.mark.slow
def test_an_interrupted_run_resumes_where_it_stopped(scratch: Path) -> None:
    definition = tiny(trace=False)

    def interrupt(row: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(definition, scratch / "out", progress=False, on_trial=interrupt)
    first = load_table(scratch / "out")
    assert len(first) == 1

    result = run_experiment(definition, scratch / "out", progress=False)
    assert (result.ran, result.skipped) == (1, 1)
    table = load_table(scratch / "out")
    assert sorted(table["system"]) == ["lazy", "tgz-overlayfs"]
    kept = table[table.key == first.key.iloc[0]]
    assert kept.started_at.iloc[0] == first.started_at.iloc[0]  # not run again

    again = run_experiment(definition, scratch / "out", progress=False)
    assert (again.ran, again.skipped) == (0, 2)


@pytest.mark.slow
def test_warm_state_keeps_the_image_and_the_block_cache(scratch: Path) -> None:
    definition = tiny(cache=["warm"], repetitions=2, trace=False)
    run_experiment(definition, scratch / "out", progress=False)
    table = load_table(scratch / "out")
    assert set(table["status"]) == {"ok"}, table["error"].tolist()
    tgz = table[table.system == "tgz-overlayfs"]
    assert (tgz.pull_s == 0).all() and (tgz.registry_bytes == 0).all()
    lazy = table[table.system == "lazy"]
    assert (lazy.cache_bytes_before > 0).all()


@pytest.mark.slow
def test_unavailable_systems_and_the_device_and_size_kinds(scratch: Path) -> None:
    device = parse_definition(
        {
            "name": "dev",
            "kind": "device",
            "workloads": ["standin-busybox"],
            "systems": ["plain-loop", "lazy-warm"],
            "repetitions": 1,
            "device": {"queue_depths": [4], "walks": ["du"], "runtime_s": 1},
        },
        "dev.toml",
    )
    run_experiment(device, scratch / "dev", progress=False)
    table = load_table(scratch / "dev")
    assert set(table["status"]) == {"ok"}, table["error"].tolist()
    reads = table[table.test == "randread-8k"]
    assert (reads.iops > 0).all() and set(reads.queue_depth) == {4}
    assert (table[table.test == "du"].seconds > 0).all()

    sizes = {"name": "s", "kind": "sizes", "workloads": ["standin-busybox"], "repetitions": 1}
    sizes = parse_definition(sizes, "s.toml")
    run_experiment(sizes, scratch / "sizes", progress=False)
    by_form = load_table(scratch / "sizes").set_index("format")["bytes"]
    assert by_form["tar.gz"] < by_form["tar"] and by_form["zfile"] < by_form["lsmt"]

    # lazy-prefetch: a warm-up start records the trace, the measured one replays it into an
    # empty block cache (so the registry is read again, by the replay).
    prefetch = tiny(systems=["lazy-prefetch"], trace=False)
    result = run_experiment(prefetch, scratch / "prefetch", progress=False)
    assert result.unavailable == {} and result.ran == 1
    (row,) = load_table(scratch / "prefetch").itertuples()
    assert row.status == "ok", row.error
    assert row.cache_bytes_before == 0 and row.registry_bytes > 0


def test_oci_whiteouts_become_overlayfs_ones(tmp_path: Path) -> None:
    require_root_tools()
    layer = tmp_path / "layer"
    (layer / "etc" / "gone").mkdir(parents=True)
    (layer / "etc" / ".wh.passwd").touch()
    (layer / "etc" / "gone" / ".wh..wh..opq").touch()
    assert convert_whiteouts(layer) == 2
    whiteout = os.stat(layer / "etc" / "passwd")
    assert os.major(whiteout.st_rdev) == 0 and os.minor(whiteout.st_rdev) == 0
    assert os.getxattr(layer / "etc" / "gone", "trusted.overlay.opaque") == b"y"
    assert not (layer / "etc" / ".wh.passwd").exists()


@pytest.mark.slow
def test_the_cloud_disk_preset_throttles_in_a_cgroup_it_removes(scratch: Path) -> None:
    if not Path("/sys/fs/cgroup/blkio").is_dir():
        pytest.skip("no cgroup v1 blkio on this machine")
    definition = tiny(systems=["tgz-overlayfs", "lazy"], disks=["cloud-disk"], trace=False)
    run_experiment(definition, scratch / "out", progress=False)
    table = load_table(scratch / "out")
    assert set(table["status"]) == {"ok"}, table["error"].tolist()
    assert set(table["disk_iops"]) == {2000} and set(table["disk_bytes_per_s"]) == {100e6}
    assert not list(Path("/sys/fs/cgroup/blkio").glob(f"workbench-experiment-{os.getpid()}"))


@pytest.mark.slow
def test_sigterm_stops_the_command_cleanly_and_the_run_resumes(scratch: Path) -> None:
    definition = scratch / "tiny.toml"
    definition.write_text(
        'name = "tiny"\nworkloads = ["standin-busybox"]\nsystems = ["tgz-overlayfs", "lazy"]\n'
        'networks = ["none"]\nrepetitions = 3\n'
    )
    out = scratch / "out"
    command = [sys.executable, "-c", "from workbench.cli import main; main()"]
    command += ["experiment", "run", str(definition), "--output", str(out), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (out / "trials.parquet").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0, output.decode()

    written = len(load_table(out))
    assert 1 <= written < 6
    assert not list((scratch / "cache").glob("run-*")), "the scratch folder was left behind"
    result = run_experiment(load_definition(definition), out, progress=False)
    assert (result.ran, result.skipped) == (6 - written, written)
