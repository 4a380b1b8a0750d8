"""The P2P scale model: registry bytes, sharing within a host, modes, traces, calibration."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pandas as pd
import pytest

from workbench.errors import WorkbenchError
from workbench.p2p.sim import (
    Params,
    Trace,
    calibrate,
    default_trace_path,
    simulate,
    sweep,
)

KiB, MiB = 1 << 10, 1 << 20
TRACE = Trace(blocks=(0, 1, 2, 7, 8, 3), block_size=256 * KiB, blob_size=4 * MiB, think_s=0.05)


def test_p2p_reads_each_block_from_the_registry_once_and_direct_once_per_host() -> None:
    for hosts in (1, 5, 40):
        p2p = simulate(Params(hosts=hosts, mode="p2p"), TRACE)
        direct = simulate(Params(hosts=hosts, mode="direct"), TRACE)
        assert p2p.registry_bytes == TRACE.nbytes
        assert direct.registry_bytes == hosts * TRACE.nbytes
        assert len(p2p.start_s) == len(direct.start_s) == hosts


def test_containers_of_one_host_share_its_fetches() -> None:
    result = simulate(Params(hosts=3, mode="direct", containers_per_host=4), TRACE)
    assert len(result.start_s) == 12
    assert result.registry_bytes == 3 * TRACE.nbytes


def test_whole_blob_and_tgz_pulls_move_whole_images() -> None:
    whole = simulate(Params(hosts=4, mode="p2p-whole"), TRACE)
    tgz = simulate(Params(hosts=4, mode="tgz", tgz_bytes=3 * MiB), TRACE)
    assert whole.registry_bytes == TRACE.blob_size  # once, through the tree
    odd = dataclasses.replace(TRACE, blob_size=5 * MiB + 3)
    assert simulate(Params(hosts=3, mode="p2p-whole"), odd).registry_bytes == 5 * MiB + 3
    assert tgz.registry_bytes == 4 * 3 * MiB
    lazy = simulate(Params(hosts=4, mode="p2p"), TRACE)
    assert lazy.mean_s < whole.mean_s and lazy.mean_s < tgz.mean_s


def test_a_slow_registry_link_makes_direct_starts_slower_with_more_hosts_but_not_p2p() -> None:
    slow = Params(host_mbps=10_000, registry_mbps=100)
    direct = [simulate(dataclasses.replace(slow, hosts=n, mode="direct"), TRACE) for n in (2, 20)]
    p2p = [simulate(dataclasses.replace(slow, hosts=n, mode="p2p"), TRACE) for n in (2, 20)]
    assert direct[1].mean_s > 3 * direct[0].mean_s
    assert p2p[1].mean_s < 1.5 * p2p[0].mean_s


def test_a_trace_from_cache_reads_lists_blocks_in_first_touch_order_and_idle_time() -> None:
    events = pd.DataFrame(
        {
            "layer": ["cache", "cache", "cache", "zfile"],
            "op": ["read", "read", "read", "read"],
            "target": ["sha256:b"] * 4,
            "offset": [600 * KiB, 0, 10, 0],
            "length": [100 * KiB, 10, 300 * KiB, 1],
            "start_ns": [0, 2_000_000_000, 2_500_000_000, 0],
            "duration_ns": [1_000_000_000, 100, 500_000_000, 1],
        }
    )
    trace = Trace.from_events(events, blob_size=MiB)
    assert trace.blocks == (2, 0, 1)  # 600-700 KiB is block 2; then 0; then 0-1
    assert trace.think_s == pytest.approx(1.5, abs=1e-6)  # idle 1 s-2 s and 2 s-2.5 s
    with pytest.raises(WorkbenchError, match="no cache reads"):
        Trace.from_events(events[events.layer == "zfile"])


def test_the_committed_trace_loads_and_scales() -> None:
    trace = Trace.from_json(default_trace_path())
    assert len(trace.blocks) > 4 and trace.blob_size > trace.nbytes
    bigger = trace.scaled(16 * MiB, blob_size=274 * MiB)
    assert bigger.nbytes == pytest.approx(16 * MiB, rel=0.1)
    assert max(bigger.blocks) < 274 * MiB // trace.block_size + 1


def test_a_local_sweep_gives_the_rows_of_single_runs_in_order() -> None:
    scenarios = [Params(hosts=n, mode="direct", registry_mbps=200) for n in (1, 3)]
    rows = sweep(scenarios, TRACE, workers=2)
    assert [row["hosts"] for row in rows] == [1, 3]
    assert rows[1]["mean_s"] == pytest.approx(simulate(scenarios[1], TRACE).mean_s)


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_a_ray_sweep_without_ray_says_how_to_get_it() -> None:
    with pytest.raises(WorkbenchError, match="ray is not installed"):
        sweep([Params()], TRACE, ray_address="auto")


def test_calibration_recovers_the_constants_of_runs_the_model_made() -> None:
    truth = Params(mount_s=0.4, mount_cpu_s=0.2, cpu_cores=2, shared_cpu=True, cpu_mib_s=0.03)
    runs = []
    for mode in ("p2p", "direct"):
        for hosts in (1, 2, 3, 4):
            result = simulate(dataclasses.replace(truth, hosts=hosts, mode=mode), TRACE)
            starts = [{"seconds": seconds} for seconds in result.start_s]
            runs.append({"mode": mode, "hosts": hosts, "mbps": None, "starts": starts})
    fit = calibrate(runs, TRACE, fit_hosts=(1, 2), base=dataclasses.replace(truth, mount_s=0.1))
    assert fit.max_error < 0.05
    assert {row["fitted"] for row in fit.rows} == {True, False}


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="mode 'ipfs'"):
        Params(mode="ipfs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        Params(fanout=0)
    assert np.isfinite(simulate(Params(hosts=1), TRACE).mean_s)


def test_a_warm_start_reads_nothing_from_the_registry_and_beats_a_cold_one() -> None:
    base = Params(hosts=10, containers_per_host=3, cpu_mib_s=0.05, mount_cpu_s=0.1)
    warm = simulate(dataclasses.replace(base, mode="warm"), TRACE)
    cold = simulate(dataclasses.replace(base, mode="p2p"), TRACE)
    assert warm.registry_bytes == 0 and len(warm.start_s) == 30
    assert warm.mean_s < cold.mean_s
