"""Converting an OCI or Docker image into an OverlayBD image, layer by layer, reproducibly.

    report = convert_image("127.0.0.1:5000/app:v1", "127.0.0.1:5000/app:v1-obd")
    print(report.table())

For source layer i (bottom first), `convert_image`:

    1. copies the layer blob to the work folder (size and sha256 checked, `oci.SourceImage`);
    2. creates a writable LSMT layer (virtual size `vsize`, 64 GiB by default) whose uuid is
       derived from the diff_ids of layers 0..i and whose parent is layer i-1's uuid;
    3. mounts the committed layers 0..i-1 plus it through the device layer
       (`workbench.device.mount.mount_image`, FUSE -> loop -> ext4); for layer 0 a new ext4
       is made first with OverlayBD's options (`workbench.convert.ext4`);
    4. applies the layer tar with OCI semantics in a chrooted child pinned to one CPU
       (`workbench.convert.apply`), checking its diff_id against the image config;
    5. unmounts ext4, normalises what the kernel stamped (times, generations, superblock
       counters; `ext4.normalize`), tears the mount down;
    6. commits the writable layer (`workbench.image.commit.commit_writable`) as ZFile
       (`algorithm`, `block_size`) in OverlayBD's tar wrapper; with `sizes` it also measures
       the layer as plain LSMT (from the trailer), as ZFile with the other algorithm, and as
       tar.gz (the source blob if it is gzip, else gzip -6 of the tar).

Then the image goes to `destination`: a registry reference (`workbench.registry.image.
push_image` with the source's image config kept, rootfs replaced) or ``oci:DIR[:TAG]``.
The report lists per layer the sizes and the converted blob's digest, and the destination
manifest's digest.

Reproducible: the same source converted twice, with the same options, on the same kernel and
e2fsprogs, gives the same layer blobs and the same manifest digest (tested). What makes it
so: seeded mkfs, fake mkfs time, single-threaded extraction in archive order pinned to one
CPU, ``nodelalloc``/``noatime``/``noinit_itable``, preserved times of directories a layer
changes without naming, and the debugfs pass over the kernel's stamps.

Caveats:
- the whole layer blob is copied to the work folder first (digest checked before a byte is
  applied); the work folder also holds the writable layer's data until it is committed;
- each converted layer is read whole into memory when pushed (`push_image`);
- layers are converted one after the other; there is no parallelism across layers (each
  needs the ones below it) and none within a layer (it would break reproducibility);
- reproducibility across machines needs the same kernel ext4 allocator and mke2fs.conf;
- what is not pinned down: the kernel's flusher may write a file's pages out before the
  applier starts their writeback (only under dirty-memory pressure: past
  ``dirty_background_ratio``, or a file dirty for 30 s), and then ext4 allocates its blocks
  on another CPU's locality group; tests convert twice and compare, and it has not been seen
  on these machines;
- a copy of a mount in another mount namespace would keep the device held after umount; the
  conversion then stops after 30 s with an error rather than normalise a live file system;
- needs root, /dev/fuse, losetup, mkfs.ext4 and debugfs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from workbench.convert.apply import apply_layer, layer_compression, open_layer
from workbench.convert.ext4 import MOUNT_OPTIONS, mkfs_arguments, mkfs_environment, normalize
from workbench.convert.oci import SourceImage, open_source, parse_layout, write_layout
from workbench.errors import LayerError
from workbench.formats.lsmt import HT_SPACE
from workbench.image.layer import ENTRY_SIZE
from workbench.registry.client import OCI_MANIFEST
from workbench.registry.image import _file_digest, _session
from workbench.registry.session import RegistrySession

__all__ = ["DEFAULT_VSIZE", "ConversionReport", "LayerReport", "convert_image"]

log = logging.getLogger(__name__)

DEFAULT_VSIZE: Final = 64 << 30
"""Virtual disk size of a converted image: OverlayBD's default (the ``vsize`` label, 64 GB)."""

ALGORITHMS: Final = ("lz4", "zstd")


@dataclasses.dataclass
class LayerReport:
    """One converted layer: the source layer, its sizes in each form, the new blob."""

    source_digest: str
    media_type: str
    diff_id: str
    entries: int
    tar: int
    """Bytes of the uncompressed layer tar."""
    tar_gz: int | None
    """Bytes as tar.gz: the source blob if it is gzip, else gzip -6 of the tar (None: not
    measured)."""
    lsmt: int
    """Bytes of the committed LSMT layer, uncompressed."""
    zfile_lz4: int | None
    zfile_zstd: int | None
    digest: str
    """The converted blob (tar around ZFile around LSMT) as pushed."""
    size: int
    uuid: str
    seconds: float


@dataclasses.dataclass
class ConversionReport:
    """What `convert_image` did: the layers and the destination manifest."""

    source: str
    destination: str
    manifest_digest: str
    algorithm: str
    block_size: int
    vsize: int
    layers: list[LayerReport]
    seconds: float

    @property
    def tar_bytes(self) -> int:
        return sum(layer.tar for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """The per-layer size table (MiB), with a total row."""
        columns = ("layer", "tar", "tar.gz", "LSMT", "ZFile lz4", "ZFile zstd", "blob")
        rows = []
        for position, layer in enumerate(self.layers):
            sizes = (layer.tar, layer.tar_gz, layer.lsmt, layer.zfile_lz4, layer.zfile_zstd)
            rows.append([str(position), *map(_mib, sizes), layer.digest[:19]])
        totals = [
            sum(getattr(layer, name) or 0 for layer in self.layers)
            if all(getattr(layer, name) is not None for layer in self.layers)
            else None
            for name in ("tar", "tar_gz", "lsmt", "zfile_lz4", "zfile_zstd")
        ]
        rows.append(["total", *map(_mib, totals), self.manifest_digest[:19]])
        widths = [max(len(row[i]) for row in [list(columns), *rows]) for i in range(7)]
        lines = ["  ".join(text.rjust(width) for text, width in zip(columns, widths, strict=True))]
        lines += [
            "  ".join(text.rjust(width) for text, width in zip(row, widths, strict=True))
            for row in rows
        ]
        return "\n".join(lines) + "\n(sizes in MiB)"


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / (1 << 20):.2f}"


# ---------------------------------------------------------------------------------------------
# The pipeline


def convert_image(
    source: str,
    destination: str,
    *,
    algorithm: str = "lz4",
    block_size: int = 4096,
    session: RegistrySession | None = None,
    progress: bool = False,
    workdir: str | os.PathLike[str] | None = None,
    vsize: int = DEFAULT_VSIZE,
    sizes: bool = True,
    run_dir: str | os.PathLike[str] | None = None,
    platform: str = "linux/amd64",
) -> ConversionReport:
    """Convert the image `source` into an OverlayBD image at `destination`.

    Parameters
    ----------
    source
        A registry reference ``host[:port]/name[:tag]`` or an OCI layout ``oci:DIR[:TAG]``.
    destination
        A registry reference with a tag, or ``oci:DIR[:TAG]``.
    algorithm, block_size
        ZFile compression of the converted layers ("lz4" or "zstd") and its block size.
    session
        The `RegistrySession` to read and push through; a private one without a block cache
        when None.
    progress
        Show tqdm progress bars (layer bytes fetched, tar bytes applied).
    workdir
        Where blobs, writable layers and mounts live meanwhile (a temporary folder, removed
        afterwards, when None; a given folder is left with the committed layers in it).
    vsize
        The virtual disk size in bytes.
    sizes
        Also measure each layer as LSMT, ZFile with the other algorithm, and tar.gz.
    run_dir
        The device layer's run folder (`mount_image`); default ``WORKDIR/run``.

    Returns
    -------
    ConversionReport

    Raises
    ------
    LayerError
        For a layer that is corrupt, truncated, hostile (paths escaping the root), does not
        match its diff_id, or does not fit in `vsize`.
    UnsupportedFormatError
        For a layer media type the converter does not read.
    RegistryError, ManifestError
        When the source cannot be read or the destination refuses the push.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    started = time.perf_counter()
    with _session(session) as active, _workdir(workdir) as work:
        image = open_source(source, active, platform)
        _check_image(image)
        run = Path(run_dir) if run_dir is not None else work / "run"

        layers: list[LayerReport] = []
        committed: list[Path] = []
        bar = _progress_bar(progress, sum(layer.size for layer in image.layers), image.name)
        try:
            for position in range(len(image.layers)):
                layer, path = _convert_layer(
                    image, position, committed, work, run, algorithm, block_size, vsize, sizes, bar
                )
                layers.append(layer)
                committed.append(path)
        finally:
            if bar is not None:
                bar.close()

        manifest_digest = _write_destination(image, destination, committed, active)

    report = ConversionReport(
        source=source,
        destination=destination,
        manifest_digest=manifest_digest,
        algorithm=algorithm,
        block_size=block_size,
        vsize=vsize,
        layers=layers,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "converted %s to %s: %d layers, %d bytes of tar in %.1f s",
        source,
        destination,
        len(layers),
        report.tar_bytes,
        report.seconds,
    )
    return report


def _check_image(image: SourceImage) -> None:
    if not image.layers:
        raise LayerError(f"image {image.name} has no layers; there is nothing to convert")
    diff_ids = image.diff_ids
    if diff_ids and len(diff_ids) != len(image.layers):
        raise LayerError(
            f"image {image.name}: the config lists {len(diff_ids)} diff_ids for "
            f"{len(image.layers)} layers; the image is inconsistent"
        )
    # Refuse unknown media types before any work is done.
    for position, layer in enumerate(image.layers):
        try:
            layer_compression(layer.media_type, b"", f"layer {position} ({layer.digest})")
        except LayerError:
            pass  # the magic is checked once the blob is here


def _convert_layer(
    image: SourceImage,
    position: int,
    below: list[Path],
    work: Path,
    run: Path,
    algorithm: str,
    block_size: int,
    vsize: int,
    sizes: bool,
    bar: Any,
) -> tuple[LayerReport, Path]:
    """Steps 1-6 of the module docstring for layer `position`; (report, committed file)."""
    from workbench.device.mount import mount_image, unmount
    from workbench.image.commit import commit_writable
    from workbench.image.writable import WritableLayer

    descriptor = image.layers[position]
    where = f"image {image.name}: layer {position} ({descriptor.digest})"
    started = time.perf_counter()
    if bar is not None:
        bar.set_postfix_str(f"layer {position + 1}/{len(image.layers)}: fetch")

    # 1. The blob, and what it is.
    blob = work / f"layer-{position}.blob"
    image.fetch_layer(position, blob, bar.update if bar is not None else None)
    with blob.open("rb") as head:
        compression = layer_compression(descriptor.media_type, head.read(4), where)

    # 2. The writable layer, uuids chained from the diff_ids.
    diff_ids = image.diff_ids or [layer.digest for layer in image.layers]
    layer_uuid = _layer_uuid(diff_ids[: position + 1])
    parent_uuid = _layer_uuid(diff_ids[:position]) if position else None
    folder = work / f"writable-{position}"
    shutil.rmtree(folder, ignore_errors=True)  # left by an earlier run that failed
    folder.mkdir()
    WritableLayer.create(
        folder / "data", folder / "index", vsize, parent_uuid=parent_uuid, uuid=layer_uuid
    ).close()
    config = work / f"config-{position}.json"
    config.write_text(
        json.dumps(
            {
                "lowers": [{"file": str(path)} for path in below],
                "upper": {"data": str(folder / "data"), "index": str(folder / "index")},
            }
        )
    )

    # 3-5. Mount, apply, normalise, tear down.
    mountpoint = work / "mnt"
    mountpoint.mkdir(exist_ok=True)
    if bar is not None:
        bar.set_postfix_str(f"layer {position + 1}/{len(image.layers)}: apply")
    mount = mount_image(
        config,
        mountpoint,
        run_dir=run,
        mkfs=mkfs_arguments(diff_ids[0]) if position == 0 else None,
        mkfs_env=mkfs_environment(),
        options=MOUNT_OPTIONS,
    )
    try:
        applied = apply_layer(
            blob,
            mountpoint,
            compression=compression,
            cpu=_pinned_cpu(),
            where=where,
            progress=_apply_progress(bar, f"layer {position + 1}/{len(image.layers)}"),
        )
        _unmount_ext4(mountpoint)
        normalize(mount.loop, applied)
    finally:
        unmount(mountpoint, run)
    if image.diff_ids and applied.diff_id != image.diff_ids[position]:
        raise LayerError(
            f"{where}: the uncompressed layer hashes to {applied.diff_id}, the image config "
            f"says {image.diff_ids[position]}; the layer is corrupt or truncated"
        )

    # 6. Commit, and the sizes of the other forms.
    if bar is not None:
        bar.set_postfix_str(f"layer {position + 1}/{len(image.layers)}: commit")
    out = work / f"layer-{position}.{algorithm}.tar"
    measured: dict[str, int | None] = {"lz4": None, "zstd": None}
    with WritableLayer.open(folder / "data", folder / "index", readonly=True) as writable:
        trailer = commit_writable(
            writable,
            out,
            uuid=layer_uuid,
            parent_uuid=parent_uuid,
            compress=algorithm,
            block_size=block_size,
            tar=True,
        )
        if sizes:
            other = "zstd" if algorithm == "lz4" else "lz4"
            scratch = work / f"layer-{position}.{other}"
            commit_writable(
                writable,
                scratch,
                uuid=layer_uuid,
                parent_uuid=parent_uuid,
                compress=other,
                block_size=block_size,
            )
            measured[other] = scratch.stat().st_size
            scratch.unlink()
    lsmt_size = trailer.index_offset + trailer.index_size * ENTRY_SIZE + HT_SPACE
    shutil.rmtree(folder)

    digest, size = _file_digest(out)
    measured[algorithm] = _zfile_size(out, size)
    tar_gz = descriptor.size if compression == "gzip" else None
    if sizes and tar_gz is None:
        tar_gz = _gzip_size(blob, compression)
    blob.unlink()

    report = LayerReport(
        source_digest=descriptor.digest,
        media_type=descriptor.media_type,
        diff_id=applied.diff_id,
        entries=applied.entries,
        tar=applied.tar_size,
        tar_gz=tar_gz,
        lsmt=lsmt_size,
        zfile_lz4=measured["lz4"],
        zfile_zstd=measured["zstd"],
        digest=digest,
        size=size,
        uuid=layer_uuid,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "%s: %d entries, %d bytes of tar -> %s (%d bytes) in %.1f s",
        where,
        report.entries,
        report.tar,
        digest,
        size,
        report.seconds,
    )
    return report, out


def _apply_progress(bar: Any, label: str) -> Any:
    """A callback showing the tar bytes applied so far on `bar` (None without a bar)."""
    if bar is None:
        return None
    return lambda count: bar.set_postfix_str(f"{label}: apply, {count / 1e6:.0f} MB of tar")


def _layer_uuid(diff_ids: list[str]) -> str:
    """The LSMT uuid of the layer whose chain (bottom first) is `diff_ids`."""
    digest = hashlib.sha256("\n".join(["workbench-convert", *diff_ids]).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4)).upper()


def _pinned_cpu() -> int:
    """The CPU the applier runs on: the lowest this process may use (the same every run)."""
    return min(os.sched_getaffinity(0))


def _unmount_ext4(mountpoint: Path) -> None:
    done = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
    if done.returncode != 0:
        raise LayerError(f"could not unmount the ext4 at {mountpoint}: {done.stderr.strip()}")


def _zfile_size(tar_path: Path, tar_size: int) -> int:
    """Bytes of the ZFile inside OverlayBD's tar wrapping."""
    from workbench.blobs.common import LocalFile
    from workbench.formats.tar import TarPayload

    with LocalFile(tar_path) as file:
        return TarPayload(file).size if tar_size else 0


def _gzip_size(blob: Path, compression: str) -> int:
    """Bytes of the layer tar compressed as gzip -6 (what docker and containerd write)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    size = 0
    with open_layer(blob, compression) as stream:
        while chunk := stream.read(4 << 20):
            size += len(compressor.compress(chunk))
    return size + len(compressor.flush())


# ---------------------------------------------------------------------------------------------
# Destination


def _write_destination(
    image: SourceImage, destination: str, committed: list[Path], session: RegistrySession
) -> str:
    from workbench.formats.config import ImageConfig, LowerConfig
    from workbench.registry.image import image_documents, push_image

    layout = parse_layout(destination)
    if layout is None:
        config = ImageConfig(lowers=[LowerConfig(file=str(path)) for path in committed])
        return push_image(config, destination, session, image_config=image.config)

    directory, tag = layout
    layers = [(*_file_digest(path), False) for path in committed]
    config_blob, manifest = image_documents(layers, image_config=image.config)
    config_digest = "sha256:" + hashlib.sha256(config_blob).hexdigest()
    blobs: list[tuple[str, Path | bytes]] = [
        (digest, path) for (digest, _, _), path in zip(layers, committed, strict=True)
    ]
    blobs.append((config_digest, config_blob))
    return write_layout(directory, tag, blobs, manifest, OCI_MANIFEST)


# ---------------------------------------------------------------------------------------------
# Plumbing


@contextlib.contextmanager
def _workdir(
    workdir: str | os.PathLike[str] | None, prefix: str = "workbench-convert-"
) -> Iterator[Path]:
    """`workdir` (made if missing, left in place), or a temporary folder removed afterwards."""
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=_scratch_root()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _scratch_root() -> str:
    """/var/tmp (disk, not tmpfs: a writable layer holds a whole layer's data)."""
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


def _progress_bar(enabled: bool, total: int, name: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {name}", leave=True)
