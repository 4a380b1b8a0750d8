"""containerd's gRPC API for Python: the .proto files Debian ships, compiled on first use.

containerd's API (snapshots, content, images, leases, diff, version and the types they share)
is defined by .proto files that Debian packages as ``golang-github-containerd-containerd-dev``
under ``/usr/share/gocode/src`` (`PROTO_ROOT`), next to gogoproto's ``gogo.proto`` that they
import. `load()` compiles them with grpcio-tools (``grpc_tools.protoc``) into a cache folder
outside the source tree, once per set of inputs, and imports the generated modules:

    api = load()
    api.snapshots.PrepareSnapshotRequest(key="k", parent="")   # snapshots_pb2
    api.snapshots_grpc.SnapshotsServicer                      # snapshots_pb2_grpc

The cache folder is ``$WORKBENCH_PROTO_DIR`` if set, else ``~/.cache/workbench/protos``; each
build lives in a subfolder named by a hash of the .proto files and the grpcio-tools and
protobuf versions, so an upgrade of either recompiles, and a build is written to a temporary
folder and renamed into place (two processes compiling at once both succeed, one keeps its
result). The generated modules are named after the proto paths (``github.com/...`` becomes
the package ``github.com...``), so the build folder goes on ``sys.path``.

Caveats:
- the generated packages ``github`` and ``gogoproto`` are top-level names on ``sys.path``
  once `load()` has run; nothing else in the workbench uses those names;
- the API version is whatever the Debian package holds (1.6.20 on bookworm); the snapshots
  API has not changed in a way that matters here since containerd 1.2.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Final

from workbench.errors import WorkbenchError

__all__ = ["PROTO_ROOT", "ProtoBuildError", "load"]

log = logging.getLogger(__name__)

PROTO_ROOT: Final = Path("/usr/share/gocode/src")
"""Where Debian's golang-github-containerd-containerd-dev puts containerd's sources."""

_API: Final = "github.com/containerd/containerd/api"
_GOGO: Final = "github.com/gogo/protobuf"

PROTO_FILES: Final = (
    f"{_API}/types/mount.proto",
    f"{_API}/types/descriptor.proto",
    f"{_API}/services/snapshots/v1/snapshots.proto",
    f"{_API}/services/content/v1/content.proto",
    f"{_API}/services/images/v1/images.proto",
    f"{_API}/services/leases/v1/leases.proto",
    f"{_API}/services/diff/v1/diff.proto",
    f"{_API}/services/version/v1/version.proto",
)
"""The .proto files compiled, relative to `PROTO_ROOT` (gogo.proto comes with them)."""

_MODULES: Final = {
    "mount": "types/mount_pb2",
    "descriptor": "types/descriptor_pb2",
    "snapshots": "services/snapshots/v1/snapshots_pb2",
    "snapshots_grpc": "services/snapshots/v1/snapshots_pb2_grpc",
    "content": "services/content/v1/content_pb2",
    "content_grpc": "services/content/v1/content_pb2_grpc",
    "images": "services/images/v1/images_pb2",
    "images_grpc": "services/images/v1/images_pb2_grpc",
    "leases": "services/leases/v1/leases_pb2",
    "leases_grpc": "services/leases/v1/leases_pb2_grpc",
    "diff": "services/diff/v1/diff_pb2",
    "diff_grpc": "services/diff/v1/diff_pb2_grpc",
    "version": "services/version/v1/version_pb2",
    "version_grpc": "services/version/v1/version_pb2_grpc",
}
"""Attribute of `load()`'s result -> generated module, relative to the API package."""


class ProtoBuildError(WorkbenchError, RuntimeError):
    """Raised when containerd's .proto files are missing or do not compile."""


_loaded: SimpleNamespace | None = None
_lock = threading.Lock()


def load(proto_root: str | os.PathLike[str] = PROTO_ROOT) -> SimpleNamespace:
    """The generated modules of containerd's API (compiled first if needed), by short name.

    Raises `ProtoBuildError` naming the missing file and the Debian package to install.
    """
    global _loaded
    with _lock:
        if _loaded is None:
            build = _build(Path(proto_root))
            if str(build) not in sys.path:
                sys.path.insert(0, str(build))
            package = _API.replace("/", ".")
            modules: dict[str, ModuleType] = {}
            for name, path in _MODULES.items():
                modules[name] = importlib.import_module(f"{package}.{path.replace('/', '.')}")
            _loaded = SimpleNamespace(**modules)
        return _loaded


def default_proto_dir() -> Path:
    configured = os.environ.get("WORKBENCH_PROTO_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "workbench" / "protos"


def _build(proto_root: Path) -> Path:
    """The build folder for these inputs; compiled now unless it exists."""
    sources = [proto_root / name for name in PROTO_FILES]
    sources.append(proto_root / _GOGO / "gogoproto" / "gogo.proto")
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        raise ProtoBuildError(
            f"containerd's API definitions are missing: {', '.join(missing)}; install the "
            "Debian package golang-github-containerd-containerd-dev (scripts/setup.sh does)"
        )

    build = default_proto_dir() / _inputs_hash(sources)
    if (build / ".complete").exists():
        return build

    build.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=build.parent))
    try:
        _compile(proto_root, staging)
        (staging / ".complete").write_text("ok\n")
        try:
            os.rename(staging, build)
        except OSError:
            # Another process finished first: its build is as good as ours.
            if not (build / ".complete").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("compiled containerd's API into %s", build)
    return build


def _inputs_hash(sources: list[Path]) -> str:
    hasher = hashlib.sha256()
    for path in sources:
        hasher.update(path.read_bytes())
    for distribution in ("grpcio-tools", "protobuf"):
        hasher.update(importlib.metadata.version(distribution).encode())
    return hasher.hexdigest()[:16]


def _compile(proto_root: Path, out: Path) -> None:
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).parent / "_proto"
    arguments = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{proto_root / _GOGO}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *PROTO_FILES,
        "gogoproto/gogo.proto",
    ]
    status = protoc.main(arguments)
    if status != 0:
        raise ProtoBuildError(
            f"grpc_tools.protoc exited {status} compiling containerd's API from {proto_root}; "
            "its messages are on stderr above"
        )
    # Every folder of the output is a package (the generated imports are absolute).
    for folder in [out, *(path for path in out.rglob("*") if path.is_dir())]:
        if folder != out:
            (folder / "__init__.py").touch()
