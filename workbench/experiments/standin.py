"""Stand-in images made from this machine's files, until `workbench.datasets` has real ones.

STAND-INS, NOT THE PAPER'S WORKLOADS. The DADI paper starts WordPress; the datasets helper
builds real images. Until those land on main, the experiments run on two images built here
from the host's own files, named ``standin-*`` everywhere (definitions, tables, figures):

- ``standin-python``: Debian's python3.11 with its standard library (about 54 MiB of files,
  .pyc included) and busybox, in two layers (libraries + busybox, then the standard
  library). The workload imports a dozen stdlib modules and exits: a small-import Python
  start, the kind ACI's TurboOCI table calls python-small-import.
- ``standin-busybox``: busybox-static alone, one layer; the workload runs ``echo ready``.

Each is built once into `cache_dir()` (``/var/tmp/workbench-experiments/standins``) in both
forms the experiments compare:

- OCI: one ``.tar.gz`` per layer (gzip level 6, as Docker writes), an OCI config and manifest;
- OverlayBD: the layers extracted into one tree, ``mkfs.ext4 -d`` into a raw disk image,
  `import_raw` into one LSMT layer (ZFile lz4, tar-wrapped), a config.v1.json;
plus the uncompressed LSMT layer, for the image-size study. `push_standin` uploads both forms
to a registry (OCI with the workbench's client, OverlayBD with `push_image`).

Caveats:
- the OverlayBD form has one layer for the whole tree (the convert helper makes one LSMT layer
  per OCI layer); start-up reads do not depend on it, layer counts do;
- the files are the host's: images differ between machines, and so do their sizes;
- tar members keep the host's mtimes truncated to whole seconds, the convention .pyc headers
  use, so no .pyc is stale inside the container (runtime-notes §2's pitfall).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from workbench.errors import WorkbenchError
from workbench.formats.config import ImageConfig, LowerConfig
from workbench.image.commit import import_raw
from workbench.registry.client import OCI_MANIFEST
from workbench.registry.image import OCI_CONFIG, push_image
from workbench.registry.reference import ImageReference
from workbench.registry.session import RegistrySession

__all__ = ["STANDINS", "BuiltImage", "Standin", "build_standin", "cache_dir", "push_standin"]

log = logging.getLogger(__name__)

OCI_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
BUILD_VERSION: Final = "1"
"""Bump to rebuild every cached stand-in (a change of how they are made)."""

PYTHON: Final = "/usr/bin/python3.11"
PYTHON_LIB: Final = "/usr/lib/python3.11"
BUSYBOX: Final = "/bin/busybox"
SKIPPED_DIRS: Final = frozenset({"idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3"})

IMPORTS: Final = (
    "json, email.parser, http.client, argparse, decimal, xml.dom.minidom, logging, "
    "urllib.request, csv, tarfile, zipfile, statistics"
)


@dataclass(frozen=True)
class Standin:
    """A stand-in workload: its image's layers (lists of host paths) and what to run."""

    name: str
    layers: tuple[tuple[str, ...], ...]
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = (("PATH", "/usr/bin:/bin"),)
    ready_means: str = "exit"
    description: str = ""


STANDINS: Final[dict[str, Standin]] = {
    "standin-python": Standin(
        "standin-python",
        layers=(("libraries", BUSYBOX, PYTHON), (PYTHON_LIB,)),
        command=(PYTHON, "-c", f"import {IMPORTS}; print('ready')"),
        description="STAND-IN: host python3.11 + stdlib, imports a dozen modules and exits",
    ),
    "standin-busybox": Standin(
        "standin-busybox",
        layers=((BUSYBOX,),),
        command=("/bin/sh", "-c", "echo ready"),
        description="STAND-IN: busybox-static, runs echo ready",
    ),
}


@dataclass(frozen=True)
class BuiltImage:
    """The files of a built stand-in: OCI layers and the OverlayBD form."""

    name: str
    directory: Path
    layer_tars: tuple[Path, ...]
    layer_tgzs: tuple[Path, ...]
    raw_ext4: Path
    lsmt: Path
    zfile: Path
    config: Path

    def sizes(self) -> dict[str, int]:
        """Bytes of the image in each form: tar, tar.gz, LSMT, ZFile (as pushed)."""
        return {
            "tar": sum(path.stat().st_size for path in self.layer_tars),
            "tar.gz": sum(path.stat().st_size for path in self.layer_tgzs),
            "lsmt": self.lsmt.stat().st_size,
            "zfile": self.zfile.stat().st_size,
        }


def cache_dir() -> Path:
    """`$WORKBENCH_EXPERIMENTS_CACHE`/standins, default /var/tmp/workbench-experiments/standins."""
    base = os.environ.get("WORKBENCH_EXPERIMENTS_CACHE", "/var/tmp/workbench-experiments")
    return Path(base) / "standins"


def build_standin(name: str, root: Path | None = None) -> BuiltImage:
    """Build stand-in `name` (once; later calls reuse the files) and return its files."""
    standin = _standin(name)
    directory = (root or cache_dir()) / f"{name}-{_fingerprint(standin)}"
    built = _files(standin, directory)
    if (directory / "complete").exists():
        return built

    log.info("building stand-in image %s in %s", name, directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    tree = directory / "rootfs"

    # The OCI form: each layer staged alone, packed as tar and tar.gz.
    for number, sources in enumerate(standin.layers):
        stage = directory / f"stage-{number}"
        _stage(sources, stage)
        _pack(stage, built.layer_tars[number], built.layer_tgzs[number])
        shutil.copytree(stage, tree, symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(stage)

    # The OverlayBD form: the merged tree as ext4, imported as one layer.
    _make_ext4(tree, built.raw_ext4)
    import_raw(built.raw_ext4, built.lsmt)
    import_raw(built.raw_ext4, built.zfile, compress="lz4", tar=True)
    ImageConfig(lowers=[LowerConfig(file=built.zfile.name)]).dump(built.config)
    shutil.rmtree(tree)
    (directory / "complete").write_text(json.dumps(built.sizes()))
    return built


def _standin(name: str) -> Standin:
    try:
        return STANDINS[name]
    except KeyError:
        known = ", ".join(STANDINS)
        raise WorkbenchError(
            f"no workload {name!r}: not a stand-in ({known}) and not in workbench.datasets"
        ) from None


def _fingerprint(standin: Standin) -> str:
    # The host files it copies: a Python or busybox upgrade makes a new image.
    stamps = [os.stat(path).st_mtime_ns for path in (PYTHON, BUSYBOX) if os.path.exists(path)]
    text = json.dumps([BUILD_VERSION, dataclasses.asdict(standin), stamps, os.uname().release])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _files(standin: Standin, directory: Path) -> BuiltImage:
    count = len(standin.layers)
    return BuiltImage(
        name=standin.name,
        directory=directory,
        layer_tars=tuple(directory / f"layer-{n}.tar" for n in range(count)),
        layer_tgzs=tuple(directory / f"layer-{n}.tar.gz" for n in range(count)),
        raw_ext4=directory / "rootfs.ext4",
        lsmt=directory / "layer.lsmt",
        zfile=directory / "layer.zfile.tar",
        config=directory / "config.v1.json",
    )


def _stage(sources: tuple[str, ...], stage: Path) -> None:
    """Copy `sources` into `stage` at their host paths; "libraries" means the ELF deps."""
    stage.mkdir(parents=True)
    for source in sources:
        paths = _libraries() if source == "libraries" else [source]
        for path in paths:
            target = stage / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if os.path.isdir(path):
                ignore = shutil.ignore_patterns(*SKIPPED_DIRS, "site-packages", "dist-packages")
                shutil.copytree(path, target, symlinks=True, ignore=ignore, dirs_exist_ok=True)
            else:
                shutil.copy2(path, target, follow_symlinks=True)
    if (stage / "bin" / "busybox").exists() and not (stage / "bin" / "sh").exists():
        os.symlink("busybox", stage / "bin" / "sh")
    for folder in ("proc", "tmp", "dev"):
        (stage / folder).mkdir(exist_ok=True)


def _libraries() -> list[str]:
    """The shared libraries python3.11 and its extension modules load (ldd)."""
    objects = [PYTHON, *map(str, Path(PYTHON_LIB, "lib-dynload").glob("*.so"))]
    done = subprocess.run(["ldd", *objects], capture_output=True, text=True)
    libraries = {"/lib64/ld-linux-x86-64.so.2"}
    for line in done.stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libraries.add(parts[2])
    return sorted(libraries)


def _pack(stage: Path, tar_path: Path, tgz_path: Path) -> None:
    """The layer as an uncompressed tar and as gzip level 6 of the same bytes."""
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(stage.rglob("*")):
            archive.add(path, arcname=str(path.relative_to(stage)), recursive=False)
    with (
        open(tar_path, "rb") as plain,
        open(tgz_path, "wb") as packed,
        gzip.GzipFile(fileobj=packed, mode="wb", compresslevel=6, mtime=0) as zipped,
    ):
        shutil.copyfileobj(plain, zipped, 1 << 20)


def _make_ext4(tree: Path, image: Path) -> None:
    used = sum(path.lstat().st_size for path in tree.rglob("*"))
    entries = sum(1 for _ in tree.rglob("*"))
    size = (int(used * 1.4) + (32 << 20)) // 4096 * 4096
    with open(image, "wb") as disk:
        disk.truncate(size)
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    command = [mkfs, "-q", "-F", "-O", "^has_journal", "-N", str(entries * 2 + 256)]
    done = subprocess.run([*command, "-d", str(tree), str(image)], capture_output=True, text=True)
    if done.returncode != 0:
        raise WorkbenchError(f"mkfs.ext4 -d {tree} failed: {done.stderr.strip()}")


def push_standin(built: BuiltImage, registry: str) -> tuple[str, str]:
    """Push both forms to `registry` (``host:port``); returns (OCI ref, OverlayBD ref)."""
    oci_ref = f"{registry}/standin/{built.name}:oci"
    lazy_ref = f"{registry}/standin/{built.name}:overlaybd"
    with RegistrySession(use_cache=False) as session:
        _push_oci(session, built, ImageReference.parse(oci_ref))
        push_image(built.config, lazy_ref, session)
    return oci_ref, lazy_ref


def _push_oci(session: RegistrySession, built: BuiltImage, ref: ImageReference) -> str:
    client = session.client
    layers = []
    for tar_path, tgz_path in zip(built.layer_tars, built.layer_tgzs, strict=True):
        data = tgz_path.read_bytes()
        digest = session.run(client.push_blob, ref, data)
        diff_id = "sha256:" + _sha256_file(tar_path)
        layers.append(({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": len(data)}, diff_id))

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
        },
        sort_keys=True,
    ).encode()
    config_digest = session.run(client.push_blob, ref, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [descriptor for descriptor, _ in layers],
    }
    raw = json.dumps(manifest, sort_keys=True).encode()
    return session.run(client.push_manifest, ref, raw, OCI_MANIFEST)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def describe_sizes(built: BuiltImage) -> str:
    sizes = built.sizes()
    buffer = io.StringIO()
    for form, nbytes in sizes.items():
        buffer.write(f"{form} {nbytes / (1 << 20):.1f} MiB  ")
    return buffer.getvalue().strip()
