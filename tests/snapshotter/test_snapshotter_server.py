"""The snapshotter over gRPC: containerd's status codes, the List stream, metrics.

The server runs in this process on a unix socket; the calls go through real gRPC (the
generated stubs, as containerd's proxy client would send them).
"""

from __future__ import annotations

import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from workbench.device.mount import MountError
from workbench.errors import RegistryError, SnapshotExistsError
from workbench.snapshotter.client import ContainerdClient
from workbench.snapshotter.server import SnapshotterServer, status_of
from workbench.snapshotter.service import Snapshotter


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[SnapshotterServer, ContainerdClient]]:
    socket_dir = Path(tempfile.mkdtemp(prefix="snap-", dir="/tmp"))
    server = SnapshotterServer(
        Snapshotter(tmp_path / "root"), socket_dir / "snap.sock", metrics_address="127.0.0.1:0"
    ).start()
    client = ContainerdClient(socket_dir / "snap.sock", timeout=30)
    try:
        yield server, client
    finally:
        client.close()
        server.stop()
        socket_dir.rmdir()


def code_of(call, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    return caught.value.code()


def test_every_call_answers_with_containerds_codes(
    served: tuple[SnapshotterServer, ContainerdClient],
) -> None:
    server, client = served
    pb, sn = client.api.snapshots, client.snapshots

    reply = sn.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"x": "1"}))
    [mount] = reply.mounts
    assert mount.type == "bind" and list(mount.options) == ["rw", "rbind"]
    assert code_of(sn.Prepare, pb.PrepareSnapshotRequest(key="a")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(sn.Stat, pb.StatSnapshotRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    assert (
        code_of(sn.Prepare, pb.PrepareSnapshotRequest(key="b", parent="a"))
        == grpc.StatusCode.INVALID_ARGUMENT
    )

    sn.Commit(pb.CommitSnapshotRequest(name="layer", key="a", labels={"y": "2"}))
    info = sn.Stat(pb.StatSnapshotRequest(key="layer")).info
    assert (info.name, info.kind, dict(info.labels)) == ("layer", pb.COMMITTED, {"y": "2"})
    assert info.created_at.ToNanoseconds() > 0
    assert code_of(sn.Mounts, pb.MountsRequest(key="layer")) == grpc.StatusCode.FAILED_PRECONDITION
    sn.View(pb.ViewSnapshotRequest(key="v", parent="layer"))
    assert [m.type for m in sn.Mounts(pb.MountsRequest(key="v")).mounts] == ["bind"]
    assert (
        code_of(sn.Remove, pb.RemoveSnapshotRequest(key="layer"))
        == grpc.StatusCode.FAILED_PRECONDITION
    )

    update = pb.UpdateSnapshotRequest(info=pb.Info(name="layer", labels={"z": "3"}))
    update.update_mask.paths.append("labels.z")
    assert dict(sn.Update(update).info.labels) == {"y": "2", "z": "3"}
    assert sn.Usage(pb.UsageRequest(key="v")).inodes == 1

    listed = [info.name for reply in sn.List(pb.ListSnapshotsRequest()) for info in reply.info]
    assert listed == ["layer", "v"]
    only = sn.List(pb.ListSnapshotsRequest(filters=['labels."z"==3']))
    assert [info.name for reply in only for info in reply.info] == ["layer"]

    sn.Remove(pb.RemoveSnapshotRequest(key="v"))
    sn.Remove(pb.RemoveSnapshotRequest(key="layer"))
    sn.Cleanup(pb.CleanupRequest())
    assert [r for r in sn.List(pb.ListSnapshotsRequest()) for _ in r.info] == []

    # Prometheus: counts per method and code, a latency histogram.
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'workbench_snapshotter_requests_total{code="OK",method="Prepare"} 1.0' in text
    assert (
        'workbench_snapshotter_requests_total{code="ALREADY_EXISTS",method="Prepare"} 1.0' in text
    )
    assert 'workbench_snapshotter_requests_total{code="NOT_FOUND",method="Stat"} 1.0' in text
    assert 'workbench_snapshotter_request_seconds_count{method="List"} 3.0' in text


def test_causes_reach_the_status_detail() -> None:
    registry = RegistryError("registry 127.0.0.1:5000, blob sha256:ab, bytes 0-4095: HTTP 503")
    assert status_of(registry) == (grpc.StatusCode.UNAVAILABLE, str(registry))
    assert status_of(SnapshotExistsError("x"))[0] == grpc.StatusCode.ALREADY_EXISTS
    mount = MountError("could not mount ext4: ...; the FUSE server's log: ChecksumError: crc")
    assert status_of(mount) == (grpc.StatusCode.UNAVAILABLE, str(mount))
    code, detail = status_of(KeyError("boom"))
    assert code == grpc.StatusCode.INTERNAL and detail == "KeyError: 'boom'"
