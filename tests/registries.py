"""Registries for tests: the embedded one, Debian's docker-registry, and helpers that seed them.

    with embedded_registry(tmp_path) as url:      # "http://127.0.0.1:PORT", storage in tmp_path
        digest = push_blob(url, "lib/x", b"data")
        manifest_digest = push_image(url, "lib/x", "v1", [layer_tar_bytes])

`docker_registry(tmp_path)` starts the CNCF distribution registry Debian packages as
`docker-registry`, with a temporary config (filesystem storage under tmp_path, a free loopback
port), waits until GET /v2/ answers and kills it on exit. Where the binary is absent the test is
skipped, unless CI is set in the environment: CI must run the tests against the reference peer,
so a missing binary fails there instead. `REGISTRIES` and the `registry_url` fixture factory let
a test module run the same tests against both.

The seeding helpers speak plain HTTP through httpx's sync client, independent of the
workbench's own client, so that tests of that client do not seed with the code under test.

Caveats:
- the free port is found by binding port 0 and closing it; another process may take it before
  docker-registry binds, so the start is retried on a new port a few times.
- push_image writes one image manifest (OCI by default, Docker schema 2 by media_types) and a
  minimal config; no index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MEDIA_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
)

REGISTRIES = ("embedded", "docker-registry")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def embedded_registry(tmp_path: Path) -> Iterator[str]:
    """The workbench's own registry over tmp_path/embedded-registry; yields its base URL."""
    from workbench.registry.server import EmbeddedRegistry

    with EmbeddedRegistry(tmp_path / "embedded-registry") as registry:
        yield registry.url


@contextlib.contextmanager
def docker_registry(tmp_path: Path) -> Iterator[str]:
    """Debian's docker-registry on a free loopback port; yields its base URL."""
    binary = shutil.which("docker-registry")
    if binary is None:
        message = "docker-registry is not installed (apt-get install docker-registry)"
        if os.environ.get("CI"):
            raise RuntimeError(message + "; CI must test against the reference registry")
        pytest.skip(message)

    from workbench.registry.peer import docker_registry as start_docker_registry

    with start_docker_registry(tmp_path / "docker-registry") as url:
        yield url


@contextlib.contextmanager
def start_registry(kind: str, tmp_path: Path) -> Iterator[str]:
    """One of REGISTRIES by name, for tests parametrized over both."""
    starter = {"embedded": embedded_registry, "docker-registry": docker_registry}[kind]
    with starter(tmp_path) as url:
        yield url


def push_blob(base_url: str, repo: str, data: bytes) -> str:
    """Uploads data as one blob (POST, then PUT with the digest); returns the digest."""
    with httpx.Client(base_url=base_url, timeout=30) as http:
        return _push_blob(http, repo, data)


def _push_blob(http: httpx.Client, repo: str, data: bytes) -> str:
    digest = sha256_digest(data)
    started = http.post(f"/v2/{repo}/blobs/uploads/")
    _expect(started, 202)
    location = started.headers["location"]
    separator = "&" if "?" in location else "?"
    finished = http.put(
        location + f"{separator}digest={digest}",
        content=data,
        headers={"content-type": "application/octet-stream"},
    )
    _expect(finished, 201)
    return digest


def push_image(
    base_url: str,
    repo: str,
    tag: str,
    layers: list[bytes],
    config: dict | None = None,
    *,
    media_types: tuple[str, str, str] = (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
) -> str:
    """Pushes the layers (as uncompressed OCI tar layers), a config and an OCI manifest.

    Returns the manifest digest. The default config is a minimal linux/amd64 one whose
    diff_ids are the layer digests (right for uncompressed layers). media_types (manifest,
    config, layer) lets a test push gzip layers (OCI_LAYER_GZIP, with a config naming the
    uncompressed diff_ids) or a Docker schema 2 image (DOCKER_MEDIA_TYPES).
    """
    with httpx.Client(base_url=base_url, timeout=30) as http:
        return _push_image(http, repo, tag, layers, config, media_types)


def _push_image(
    http: httpx.Client,
    repo: str,
    tag: str,
    layers: list[bytes],
    config: dict | None,
    media_types: tuple[str, str, str] = (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
) -> str:
    manifest_type, config_type, layer_type = media_types
    layer_digests = [_push_blob(http, repo, layer) for layer in layers]
    if config is None:
        config = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": layer_digests},
        }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = _push_blob(http, repo, config_bytes)

    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": config_digest, "size": len(config_bytes)},
        "layers": [
            {"mediaType": layer_type, "digest": digest, "size": len(layer)}
            for digest, layer in zip(layer_digests, layers, strict=True)
        ],
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    response = http.put(
        f"/v2/{repo}/manifests/{tag}",
        content=manifest_bytes,
        headers={"content-type": manifest_type},
    )
    _expect(response, 201)
    return sha256_digest(manifest_bytes)


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise AssertionError(
            f"{response.request.method} {response.request.url} answered "
            f"{response.status_code}, expected {status}: {response.text[:500]}"
        )


@dataclasses.dataclass(frozen=True)
class ContainerdDaemon:
    """A running containerd of containerd_daemon(): its socket, pid, log and directories."""

    socket: str
    pid: int
    log: Path
    directory: Path
    namespace: str = "workbench-test"

    def ctr(self, *args: str, timeout: float = 60) -> str:
        """Runs `ctr -a SOCKET -n NAMESPACE ARGS...`; returns stdout, fails with stderr."""
        return self.ctr_bytes(*args, timeout=timeout).decode()

    def ctr_bytes(self, *args: str, timeout: float = 60) -> bytes:
        """As ctr(), for binary output such as `content get`."""
        command = ["ctr", "-a", self.socket, "-n", self.namespace, *args]
        done = subprocess.run(command, capture_output=True, timeout=timeout)
        if done.returncode != 0:
            stderr = done.stderr.decode(errors="replace").strip()[-2000:]
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}: {stderr}")
        return done.stdout


@contextlib.contextmanager
def containerd_daemon(
    tmp_path: Path, proxy_snapshotters: dict[str, str] | None = None
) -> Iterator[ContainerdDaemon]:
    """A private containerd (CRI off) with root, state, socket and opt dir under tmp_path.

    `proxy_snapshotters` maps names to the unix sockets of proxy snapshotters to declare
    (``[proxy_plugins]``; containerd dials them lazily, so they may start later).

    Skipped where containerd or ctr is absent or the process is not root (containerd needs
    root to mount snapshots), unless CI is set: then a missing peer fails the test. On exit the
    daemon gets SIGTERM (SIGKILL after 10 s), is reaped, and every mount it left under its
    directory is unmounted, so nothing outlives the test (`workbench.snapshotter.peer`).
    """
    from workbench.snapshotter import peer

    reason = peer.missing()
    if reason is not None:
        if os.environ.get("CI"):
            raise RuntimeError(reason + "; CI must test against a real containerd")
        pytest.skip(reason)

    with peer.containerd(tmp_path / "containerd", proxy_snapshotters) as daemon:
        yield ContainerdDaemon(daemon.socket, daemon.pid, daemon.log, daemon.directory)
