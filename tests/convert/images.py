"""Source images for the conversion tests, built with Python's tarfile so that every entry type
and every OCI rule is covered: gzip and plain layers, whiteouts, an opaque directory, hard
links, symlinks, devices, a FIFO, owners, setuid, xattrs, nanosecond times, a sparse file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MTIME = 1_700_000_000


def pattern(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, np.uint8).tobytes()


@dataclass
class Entry:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)
    sparse_size: int = 0
    """For a GNU sparse file: its size; `data` is then written at offset 1 MiB."""


def layer_tar(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.type
            info.mode = entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.mtime = MTIME
            info.linkname = entry.linkname
            info.devmajor, info.devminor = entry.devmajor, entry.devminor
            info.pax_headers = dict(entry.pax)
            info.size = len(entry.data) if entry.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(entry.data) if info.size else None)
    return buffer.getvalue()


def sparse_member(name: str, size: int, data: bytes, at: int) -> bytes:
    """A PAX 1.0 sparse file (GNU tar's --sparse format) as tar bytes without the end marker."""
    sparse_map = f"1\n{at}\n{len(data)}\n".encode()
    sparse_map += b"\0" * (-len(sparse_map) % 512)
    body = sparse_map + data + b"\0" * (-len(data) % 512)
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.size = len(sparse_map) + len(data)
    info.mtime = MTIME
    info.mode = 0o644
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(size),
    }
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return header + body


R, D, S, L = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
C, B, F = tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE


def base_layer() -> list[Entry]:
    return [
        Entry("./", D, mode=0o755),
        Entry("etc/", D, mode=0o755),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry("etc/shadow", data=b"root:*:19000::::::\n", mode=0o640, gid=42),
        Entry("etc/localtime", S, linkname="/usr/share/zoneinfo/UTC"),
        Entry("usr/share/zoneinfo/UTC", data=b"TZif2 utc"),
        Entry("usr/bin/", D, mode=0o755),
        Entry("usr/bin/sudo", data=pattern(70_000, 1), mode=0o4755),
        Entry("usr/bin/sudoedit", L, linkname="usr/bin/sudo"),
        Entry(
            "usr/bin/ping",
            data=pattern(5000, 2),
            mode=0o755,
            pax={
                "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00"
                "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            },
        ),
        Entry(
            "home/user/notes.txt",
            data=b"hello\n",
            uid=1000,
            gid=1000,
            mode=0o600,
            pax={
                "SCHILY.xattr.user.comment": "kept",
                "mtime": f"{MTIME}.123456789",
            },
        ),
        Entry("home/user/empty", data=b"", uid=1000, gid=1000),
        Entry("home/user/big.bin", data=pattern(3 << 20, 3)),
        Entry("home/user/zeros.bin", data=bytes(2 << 20)),
        Entry("dev/null", C, mode=0o666, devmajor=1, devminor=3),
        Entry("dev/loop9", B, mode=0o660, devmajor=7, devminor=9, gid=6),
        Entry("run/fifo", F, mode=0o620),
        Entry("tmp/", D, mode=0o1777),
        Entry("opt/app/lib/a.so", data=b"a"),
        Entry("opt/app/lib/b.so", data=b"b"),
        Entry("opt/app/config", data=b"old"),
        Entry("var/cache/junk", data=b"junk"),
        Entry("var/log/old.log", data=b"log"),
        Entry("srv/shared", data=b"shared inode"),
        Entry("srv/shared-link", L, linkname="srv/shared"),
        Entry("a/" + "long-name-" * 12 + "end", data=b"a long path (PAX path record)"),
    ]


def upper_layer() -> list[Entry]:
    return [
        Entry("var/cache/.wh.junk"),
        Entry("var/.wh.log"),
        Entry("opt/app/", D, mode=0o750),
        Entry("opt/app/.wh..wh..opq"),
        Entry("opt/app/config", data=b"new"),
        Entry(
            "etc/passwd", data=b"root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:\n"
        ),
        Entry("home/user/notes.txt", D, mode=0o700, uid=1000, gid=1000),
        Entry("usr/share/zoneinfo/UTC", S, linkname="Etc/UTC"),
        Entry("usr/bin/ping.hard", L, linkname="usr/bin/ping"),
        Entry("srv/.wh.shared"),
        Entry("etc/new.conf", data=b"added into an existing directory"),
    ]


@dataclass
class SourceImage:
    """The layers of an image as pushed: blob bytes, media types, and the config."""

    blobs: list[bytes]
    media_types: list[str]
    config: dict

    def manifest(self, config_digest: str, config_size: int) -> dict:
        return {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
            "layers": [
                {"mediaType": media_type, "digest": digest(blob), "size": len(blob)}
                for blob, media_type in zip(self.blobs, self.media_types, strict=True)
            ],
        }


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_image(tars: list[bytes], gzipped: list[bool] | None = None) -> SourceImage:
    """An image of layer tars (gzip where asked), with env, cmd and history in its config."""
    gzipped = gzipped or [False] * len(tars)
    blobs = [gzip.compress(t, mtime=0) if z else t for t, z in zip(tars, gzipped, strict=True)]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [digest(t) for t in tars]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(tars))],
    }
    media = [OCI_LAYER_GZIP if z else OCI_LAYER for z in gzipped]
    return SourceImage(blobs, media, config)


def standard_image() -> SourceImage:
    return make_image([layer_tar(base_layer()), layer_tar(upper_layer())], [True, False])


def write_layout(image: SourceImage, directory: Path, tag: str = "v1") -> str:
    """The image as an OCI layout at `directory`; returns ``oci:DIR:TAG``."""
    store = directory / "blobs" / "sha256"
    store.mkdir(parents=True, exist_ok=True)
    config = json.dumps(image.config).encode()
    manifest = json.dumps(image.manifest(digest(config), len(config))).encode()
    for blob in [*image.blobs, config, manifest]:
        (store / digest(blob).partition(":")[2]).write_bytes(blob)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return f"oci:{directory}:{tag}"
