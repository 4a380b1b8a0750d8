"""`workbench bench convert`: conversion throughput against ``tar -x`` onto ext4, same run.

The image: `layers` gzip layers cut from this machine's ``/usr`` (files in path order, about
`layer_mb` MB of tar each; the same machine gives the same image), as an OCI layout.

Measured, in the same run, on the same disk (the work folder):
- **convert**: `convert_image` from the layout into another layout (fetch copy, per layer:
  mount through FUSE + loop, apply, normalise, e2fsck, commit as ZFile lz4 in tar), without
  the extra size measurements;
- **tar -x**: the same layers unpacked one after the other with ``tar -xzf`` onto an ext4
  (OverlayBD's mkfs options) on a loop device over a sparse file of the same virtual size,
  up to its unmount (which writes everything out).
Both are printed as MB of layer tar per second; the ratio convert / tar is the figure.

Caveats:
- the baseline writes to a local file through the kernel only; the conversion also goes
  through FUSE, the LSMT writable layer, compression and a consistency check, so a ratio well
  below 1 is expected (see the README for the figure measured here);
- the page cache is not dropped between the two (both read their layers from the work
  folder, written just before).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

__all__ = ["ConvertBenchmark", "run"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclasses.dataclass
class ConvertBenchmark:
    layers: int = 3
    layer_mb: int = 100
    source_root: str = "/usr"

    @classmethod
    def quick(cls) -> ConvertBenchmark:
        return cls(layers=2, layer_mb=12)


def _files(root: str) -> Iterator[Path]:
    for folder, directories, names in os.walk(root):
        directories.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _build_layers(settings: ConvertBenchmark) -> list[bytes]:
    """`layers` tars of about `layer_mb` MB each from `source_root`, gzip-compressed."""
    files = _files(settings.source_root)
    layers = []
    for _ in range(settings.layers):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            while buffer.tell() < settings.layer_mb << 20:
                path = next(files, None)
                if path is None:
                    break
                try:
                    tar.add(path, arcname=str(path).lstrip("/"), recursive=False)
                except OSError:
                    continue
        layers.append(buffer.getvalue())
    return layers


def _write_layout(tars: list[bytes], directory: Path) -> str:
    from workbench.convert.oci import write_layout

    blobs = [gzip.compress(tar, compresslevel=1, mtime=0) for tar in tars]

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest(tar) for tar in tars]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(blob),
                    "size": len(blob),
                }
                for blob in blobs
            ],
        }
    ).encode()
    contents: list[tuple[str, Path | bytes]] = [(digest(b), b) for b in [*blobs, config]]
    write_layout(directory, "bench", contents, manifest, OCI_MANIFEST)
    for position, blob in enumerate(blobs):
        (directory.parent / f"layer-{position}.tar.gz").write_bytes(blob)
    return f"oci:{directory}:bench"


def _tar_baseline(layers: list[Path], scratch: Path, vsize: int) -> float:
    """Seconds to unpack `layers` with tar -xzf onto a fresh ext4 on a loop device."""
    from workbench.convert.ext4 import mkfs_arguments

    disk = scratch / "baseline.raw"
    with open(disk, "wb") as file:
        file.truncate(vsize)
    mountpoint = scratch / "baseline"
    mountpoint.mkdir()
    loop = _run(["losetup", "--find", "--show", str(disk)]).strip()
    try:
        _run(["mkfs.ext4", "-q", "-F", *mkfs_arguments("bench"), loop])
        _run(["mount", "-t", "ext4", loop, str(mountpoint)])
        try:
            started = time.perf_counter()
            for layer in layers:
                _run(["tar", "-xzf", str(layer), "-C", str(mountpoint)])
        finally:
            _run(["umount", str(mountpoint)])
        return time.perf_counter() - started
    finally:
        _run(["losetup", "-d", loop])
        disk.unlink()


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def run(settings: ConvertBenchmark, out: TextIO, workdir: str | None = None) -> dict[str, Any]:
    """Run the benchmark, print its table to `out`, return the figures."""
    from workbench.convert import convert_image
    from workbench.convert.convert import DEFAULT_VSIZE

    scratch = Path(tempfile.mkdtemp(prefix="workbench-bench-convert-", dir=workdir or "/var/tmp"))
    try:
        tars = _build_layers(settings)
        tar_bytes = sum(len(tar) for tar in tars)
        source = _write_layout(tars, scratch / "source")
        layer_files = [scratch / f"layer-{i}.tar.gz" for i in range(len(tars))]

        baseline_s = _tar_baseline(layer_files, scratch, DEFAULT_VSIZE)
        started = time.perf_counter()
        report = convert_image(
            source, f"oci:{scratch / 'converted'}:bench", sizes=False, workdir=scratch / "work"
        )
        convert_s = time.perf_counter() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    mb = tar_bytes / 1e6
    figures = {
        "layers": len(tars),
        "tar_mb": mb,
        "convert_s": convert_s,
        "tar_x_s": baseline_s,
        "convert_mb_s": mb / convert_s,
        "tar_x_mb_s": mb / baseline_s,
        "ratio": baseline_s / convert_s,
        "converted_mb": sum(layer.size for layer in report.layers) / 1e6,
    }
    print(
        f"conversion throughput, {len(tars)} gzip layers from {settings.source_root}, "
        f"{mb:.1f} MB of tar",
        file=out,
    )
    print(f"{'':24}{'seconds':>10}{'MB/s':>10}", file=out)
    print(f"{'tar -xzf onto ext4':24}{baseline_s:>10.2f}{figures['tar_x_mb_s']:>10.1f}", file=out)
    print(f"{'workbench convert':24}{convert_s:>10.2f}{figures['convert_mb_s']:>10.1f}", file=out)
    print(
        f"ratio convert / tar -x: {figures['ratio']:.2f} "
        f"(converted layers: {figures['converted_mb']:.1f} MB of ZFile lz4)",
        file=out,
    )
    return figures
