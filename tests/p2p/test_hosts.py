"""Real hosts in network namespaces: shaped links, P2P agents, devices starting at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from workbench.device.mount import list_mounts
from workbench.p2p.cluster import Cluster
from workbench.p2p.hosts import HostNetwork, leftovers


def require_hosts() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "network namespaces and mounts need root"
    elif missing := [
        t for t in ("ip", "tc", "nsenter", "mkfs.ext4", "losetup") if not shutil.which(t)
    ]:
        reason = f"{', '.join(missing)} missing; install iproute2, util-linux, e2fsprogs"
    elif not os.path.exists("/dev/fuse"):
        reason = "/dev/fuse is missing"
    if reason is None:
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{reason}; CI must run the P2P host tests")
    pytest.skip(reason)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    require_hosts()
    return tmp_path


def test_hosts_get_shaped_links_and_everything_is_removed_even_after_an_error(
    workdir: Path,
) -> None:
    with pytest.raises(RuntimeError, match="boom"), HostNetwork(2, mbps=50, run_dir=workdir) as net:
        tag = net.tag
        qdisc = net.hosts[0].run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert "tbf" in qdisc and "50Mbit" in qdisc

        server = net.hosts[0].popen(
            [sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "8123", "-d", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://{net.hosts[0].address}:8123/"
        for _ in range(50):
            fetched = net.hosts[1].run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url])
            if fetched.stdout == "200":
                break
            time.sleep(0.1)
        assert fetched.stdout == "200"  # host 1 reaches host 0 across the bridge
        raise RuntimeError("boom")

    assert server.poll() is not None
    assert leftovers(tag) == []
    assert not list((workdir / "p2p-hosts").glob("*.json"))


@pytest.mark.slow
def test_hosts_starting_at_once_through_p2p_get_each_block_from_the_registry_once(
    workdir: Path,
) -> None:
    with Cluster(workdir, 4, mode="p2p", mbps=400, app_mib=4, rest_mib=8) as cluster:
        tag = cluster.network.tag
        results = cluster.start_all()
        counts = cluster.block_counts()
        root = httpx.get(f"{cluster.root_url}/p2p/stats").json()

    assert [result.bytes_read for result in results] == [4 << 20] * 4  # and sha256-checked
    assert counts and max(counts.values()) == 1  # no block left the registry twice
    tree = root["topology"]["trees"]
    assert any(len(members) == 4 for members in tree.values())  # all four joined one tree

    assert leftovers(tag) == []  # no namespace, bridge or veth
    assert all(agent.poll() is not None for agent in cluster.agents.values())
    assert not any(list_mounts(run) for run in (workdir / "run").glob("h*"))
    assert not _processes_mentioning(str(workdir))  # no FUSE server, agent or root


@pytest.mark.slow
def test_direct_starts_make_the_registry_serve_each_block_once_per_host(workdir: Path) -> None:
    with Cluster(workdir, 3, mode="direct", app_mib=4, rest_mib=8) as cluster:
        cluster.start_all()
        counts = cluster.block_counts()
    assert max(counts.values()) == 3  # the baseline the P2P test is measured against


@pytest.mark.slow
def test_a_killed_parent_does_not_fail_its_children(workdir: Path) -> None:
    with Cluster(workdir, 3, mode="p2p", fanout=1, app_mib=4, rest_mib=8) as cluster:
        first, middle, last = cluster.hosts
        cluster.start(first)  # the chain root -> h0 -> h1 -> h2 forms in join order
        mountpoint = cluster.mount(middle)  # h1's parent is h0

        cluster.kill_agent(first.index)
        assert cluster.read(mountpoint) == 4 << 20  # finished through a new parent
        assert cluster.start(last).bytes_read == 4 << 20

        stats = middle.run(["curl", "-s", "http://127.0.0.1:7000/p2p/stats"]).stdout
        root = httpx.get(f"{cluster.root_url}/p2p/stats").json()
    assert '"reselections": 0' not in stats
    assert first.address in " ".join(root["topology"]["dead"])


def test_the_leftovers_of_a_dead_owner_are_removed_and_nothing_else(workdir: Path) -> None:
    import json

    from workbench.p2p.hosts import cleanup_stale

    dead = subprocess.Popen(["true"])
    dead.wait()
    with HostNetwork(1, run_dir=workdir) as live, HostNetwork(1, run_dir=workdir) as crashed:
        state = workdir / "p2p-hosts" / f"{crashed.tag}.json"
        record = json.loads(state.read_text())
        state.write_text(json.dumps({**record, "owner": dead.pid}))  # as if its owner died

        removed = cleanup_stale(workdir / "p2p-hosts")
        assert sorted(removed) == sorted([crashed.hosts[0].name, crashed.bridge])
        assert leftovers(crashed.tag) == []
        assert leftovers(live.tag) != []  # a live owner's hosts are left alone
    assert leftovers(live.tag) == []
