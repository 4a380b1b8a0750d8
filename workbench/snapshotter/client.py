"""A small containerd client over gRPC: the calls `rpull` and the benchmarks need.

containerd's API is namespaced by a gRPC metadata header (``containerd-namespace``) and
resources made inside a lease carry ``containerd-lease`` so that its garbage collector
keeps them until the lease goes. `ContainerdClient` sets both on every call:

    with ContainerdClient("/run/containerd/containerd.sock", "default") as client:
        with client.lease():
            client.write_content(data, media_type_labels)
            client.snapshots.Stat(api.snapshots.StatSnapshotRequest(snapshotter=..., key=...))

Stubs: `content`, `images`, `leases`, `snapshots`, `diff`, `version` (the generated
``*Stub`` classes of `workbench.snapshotter.protos`), wrapped so that the metadata is added.

Caveats:
- a content write sends the blob in 1 MiB messages of one stream; there is no resume of a
  write interrupted midway (it is aborted and can be started again).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any, Final

import grpc

from workbench.snapshotter import protos

__all__ = ["ContainerdClient", "grpc_code"]

log = logging.getLogger(__name__)

CHUNK: Final = 1 << 20
LEASE_EXPIRY: Final = 3600
"""Seconds after which containerd may collect a lease this client forgot to delete."""


def grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a gRPC error, None for anything else."""
    if isinstance(exc, grpc.RpcError):
        return exc.code()  # type: ignore[no-any-return]
    return None


class _Stub:
    """A generated stub whose calls get the client's metadata."""

    def __init__(self, stub: Any, client: ContainerdClient) -> None:
        self._stub = stub
        self._client = client

    def __getattr__(self, method: str) -> Any:
        call = getattr(self._stub, method)

        def invoke(request: Any, **kw: Any) -> Any:
            kw.setdefault("metadata", self._client.metadata())
            kw.setdefault("timeout", self._client.timeout)
            return call(request, **kw)

        return invoke


class ContainerdClient:
    """A connection to containerd (or any server of its API) on a unix socket."""

    def __init__(
        self, address: str | os.PathLike[str], namespace: str = "default", timeout: float = 600
    ) -> None:
        self.api = protos.load()
        self.address = os.fspath(address)
        self.namespace = namespace
        self.timeout = timeout
        self.lease_id: str | None = None
        self.channel = grpc.insecure_channel(
            f"unix:{self.address}",
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        api = self.api
        self.content = _Stub(api.content_grpc.ContentStub(self.channel), self)
        self.images = _Stub(api.images_grpc.ImagesStub(self.channel), self)
        self.leases = _Stub(api.leases_grpc.LeasesStub(self.channel), self)
        self.snapshots = _Stub(api.snapshots_grpc.SnapshotsStub(self.channel), self)
        self.diff = _Stub(api.diff_grpc.DiffStub(self.channel), self)
        self.version = _Stub(api.version_grpc.VersionStub(self.channel), self)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def metadata(self) -> list[tuple[str, str]]:
        pairs = [("containerd-namespace", self.namespace)]
        if self.lease_id is not None:
            pairs.append(("containerd-lease", self.lease_id))
        return pairs

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        """A lease for the calls inside the block; deleted at its end (kept resources stay
        if something else references them: an image, a label)."""
        leases = self.api.leases
        lease_id = f"workbench-{secrets.token_hex(6)}"
        expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + LEASE_EXPIRY))
        self.leases.Create(
            leases.CreateRequest(id=lease_id, labels={"containerd.io/gc.expire": expiry})
        )
        self.lease_id = lease_id
        try:
            yield lease_id
        finally:
            self.lease_id = None
            self.leases.Delete(leases.DeleteRequest(id=lease_id))

    # Content

    def write_content(self, data: bytes, labels: dict[str, str] | None = None) -> str:
        """Put `data` in the content store (with `labels`); its digest. Present content
        gets the labels added."""
        content = self.api.content
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        ref = f"workbench-{digest}"

        def requests() -> Iterator[Any]:
            for offset in range(0, max(len(data), 1), CHUNK):
                last = offset + CHUNK >= len(data)
                yield content.WriteContentRequest(
                    action=content.COMMIT if last else content.WRITE,
                    ref=ref,
                    total=len(data),
                    expected=digest,
                    offset=offset,
                    data=data[offset : offset + CHUNK],
                    labels=(labels or {}) if last else {},
                )

        try:
            for _reply in self.content.Write(requests()):
                pass
        except grpc.RpcError as exc:
            if grpc_code(exc) != grpc.StatusCode.ALREADY_EXISTS:
                raise
            if labels:
                self.label_content(digest, labels)
        return digest

    def label_content(self, digest: str, labels: dict[str, str]) -> None:
        """Set `labels` on content `digest` (other labels stay)."""
        content = self.api.content
        info = content.Info(digest=digest, labels=labels)
        mask = [f"labels.{key}" for key in labels]
        request = content.UpdateRequest(info=info)
        request.update_mask.paths.extend(mask)
        self.content.Update(request)

    def has_content(self, digest: str) -> bool:
        try:
            self.content.Info(self.api.content.InfoRequest(digest=digest))
        except grpc.RpcError as exc:
            if grpc_code(exc) == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True
