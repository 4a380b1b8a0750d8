"""The runner on the evaluation images of `workbench.datasets`, both systems, for real.

The busybox image (built offline in well under a second) runs through `tgz-overlayfs` and
`lazy` on every run: pushed, converted to OverlayBD, pulled, launched in the runner's
unshare + chroot and ready through its own HTTP probe, polled inside its network namespace.
The Debian-based images only with the opt-in ``WORKBENCH_SLOW_DATASETS=1`` (minutes each
with a cold dataset cache, the default one or ``WORKBENCH_DATASETS_DIR``).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import pytest
from test_runner import require_root_tools, scratch, tiny  # noqa: F401 (scratch: a fixture)

from workbench import datasets
from workbench.datasets.probes import ExitProbe
from workbench.errors import ProbeError
from workbench.experiments.definition import parse_definition
from workbench.experiments.runner import load_table, run_experiment
from workbench.experiments.systems import Workload
from workbench.experiments.workloads import _wait_probe, dataset_workload

DEBIAN = ["debian", "nginx", "redis", "postgres", "python-numpy-pandas", "wordpress"]


def need_ip() -> None:
    """`ip` brings up lo in the http workloads' network namespace."""
    if shutil.which("ip") is not None:
        return
    if os.environ.get("CI"):
        raise RuntimeError("ip (iproute2) is missing; CI installs it through setup.sh")
    pytest.skip("ip (iproute2) is missing; run scripts/setup.sh")


@pytest.fixture
def dataset_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The datasets' cache under tmp_path, unless WORKBENCH_DATASETS_DIR names a warm one."""
    need_ip()
    if not os.environ.get("WORKBENCH_DATASETS_DIR"):
        monkeypatch.setenv("WORKBENCH_DATASETS_DIR", str(tmp_path / "datasets"))


def test_each_probe_kind_maps_onto_the_launcher() -> None:
    http = dataset_workload(datasets.workload("busybox"))
    echo = dataset_workload(datasets.workload("busybox", "echo"))
    python = dataset_workload(datasets.workload("python-numpy-pandas"))

    assert isinstance(http, Workload) and http.private_net and http.ready is not None
    assert http.ready_means == datasets.workload("busybox").ready_means
    assert not echo.private_net and echo.command == ("/bin/echo", "hello")
    assert python.workdir == "/app" and not python.private_net


def test_an_exit_probe_that_sees_another_code_says_why() -> None:
    import subprocess

    command = ["sh", "-c", "echo hi; exit 3"]
    with (
        subprocess.Popen(command, stdout=subprocess.PIPE) as process,
        pytest.raises(ProbeError, match="code 3"),
    ):
        _wait_probe(ExitProbe(code=0), process, time.monotonic() + 30)


@pytest.mark.slow
def test_busybox_dataset_starts_on_both_systems(
    scratch: Path,  # noqa: F811 (the fixture imported from test_runner)
    dataset_cache: None,
) -> None:
    definition = tiny(workloads=["busybox"], repetitions=1)

    run_experiment(definition, scratch / "out", progress=False)

    table = load_table(scratch / "out")
    assert len(table) == 2 and set(table["status"]) == {"ok"}, table["error"].tolist()
    assert set(table["system"]) == {"tgz-overlayfs", "lazy"}
    assert set(table["workload_source"]) == {"datasets"}
    assert set(table["ready_means"]) == {datasets.workload("busybox").ready_means}
    for row in table.itertuples():
        assert row.pull_s > 0 and row.launch_s > 0 and row.registry_bytes > 0
    lazy = table[table.system == "lazy"].iloc[0]
    assert lazy.cache_misses > 0


@pytest.mark.slow
def test_busybox_dataset_sizes_come_from_the_conversion(
    scratch: Path,  # noqa: F811
    dataset_cache: None,
) -> None:
    document = {"name": "tiny-sizes", "kind": "sizes", "workloads": ["busybox"], "repetitions": 1}
    definition = parse_definition(document, "tiny-sizes.toml")

    run_experiment(definition, scratch / "out", progress=False)

    table = load_table(scratch / "out").set_index("format")
    assert set(table["status"]) == {"ok"}, table["error"].tolist()
    for form in ("tar", "tar.gz", "lsmt", "zfile"):
        assert table.loc[form, "bytes"] > 0 and not math.isnan(table.loc[form, "bytes"])
    assert table.loc["tar.gz", "bytes"] < table.loc["tar", "bytes"]


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("WORKBENCH_SLOW_DATASETS"),
    reason="the Debian images take minutes and the mirror; set WORKBENCH_SLOW_DATASETS=1",
)
@pytest.mark.parametrize("name", DEBIAN)
def test_debian_dataset_starts_on_both_systems(scratch: Path, name: str) -> None:  # noqa: F811
    need_ip()
    definition = tiny(workloads=[name], repetitions=1, timeout_s=300)

    run_experiment(definition, scratch / "out", progress=False)

    table = load_table(scratch / "out")
    assert set(table["status"]) == {"ok"}, table["error"].tolist()
    assert set(table["ready_means"]) == {datasets.workload(name).ready_means}
