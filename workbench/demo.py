"""The demo: a layered image built from a few writes, committed, compressed and read back.

It walks the formats in the order a container image lives through them:

1. a writable layer takes writes (a "base system": random bytes, text, a pattern);
2. it is committed to a read-only layer, compressed as ZFile (lz4) and wrapped in tar, as a
   registry would store it;
3. a second writable layer on top overwrites part of the first and trims a range (a deleted
   file), and is committed with zstd;
4. a third writable layer stays writable, and `config.v1.json` describes the stack;
5. the merged image is read back and every byte checked against a plain model of the disk,
   a traced read shows the path of one request through the layers, and `inspect` describes
   each file;
6. the layers are pushed to the embedded registry and the image is read again lazily: a
   small read fetches only headers, indexes and the blocks it needs, through the block cache.

The model is a bytearray the size of the disk that receives the same writes and trims; the
image must equal it byte for byte, or the demo fails.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import uuid
from collections.abc import Callable
from pathlib import Path

from workbench.formats.config import ImageConfig, LowerConfig, UpperConfig
from workbench.image.commit import commit_writable
from workbench.image.open import open_image
from workbench.image.writable import WritableLayer
from workbench.inspect import describe, render_text
from workbench.registry.reference import ImageReference
from workbench.registry.server import EmbeddedRegistry
from workbench.registry.session import RegistrySession
from workbench.tracing import recording, request

log = logging.getLogger(__name__)

__all__ = ["VIRTUAL_SIZE", "run_demo"]

VIRTUAL_SIZE = 64 << 20
"""A 64 MiB disk: big enough for several segments per layer, small enough to check whole."""

MiB = 1 << 20


class DiskModel:
    """The disk as it should read: a bytearray that takes the same writes and trims."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def trim(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)


def _text(size: int, rng: random.Random) -> bytes:
    words = ["layer", "block", "segment", "sector", "registry", "lazy", "image", "merge"]
    out = bytearray()
    while len(out) < size:
        out += (" ".join(rng.choice(words) for _ in range(12)) + "\n").encode()
    return bytes(out[:size])


def _apply(layer: WritableLayer, model: DiskModel, writes: list[tuple[int, bytes]]) -> None:
    for offset, data in writes:
        layer.pwrite(offset, data)
        model.write(offset, data)


def run_demo(workdir: Path, say: Callable[[str], None] = print) -> bool:
    """Build, commit, read back and inspect the demo image in `workdir`; True if all matched."""
    rng = random.Random(2020)
    model = DiskModel(VIRTUAL_SIZE)
    workdir.mkdir(parents=True, exist_ok=True)

    # 1-2. The base layer: a few "files", committed as tar(ZFile lz4(LSMT)).
    say(f"1. base layer: writes into a new writable layer of a {VIRTUAL_SIZE >> 20} MiB disk")
    base = WritableLayer.create(
        workdir / "base.data", workdir / "base.index", VIRTUAL_SIZE, uuid=_uuid(rng)
    )
    with base:
        _apply(
            base,
            model,
            [
                (0, rng.randbytes(MiB)),
                (4 * MiB, _text(3 * MiB, rng)),
                (20 * MiB, bytes(range(256)) * 4096),
                (63 * MiB, rng.randbytes(512 * 1024)),
            ],
        )
        base.flush()
        base_uuid = base.uuid
        commit_writable(
            base, workdir / "base.tar", uuid=base_uuid, message="base", compress="lz4", tar=True
        )
    say("   committed: base.tar (tar wrapper, ZFile lz4, 4 KiB blocks)")

    # 3. The second layer: overwrite part of the base, trim a range, commit with zstd.
    say("2. app layer: overwrite part of the base, trim 1 MiB of it, commit with zstd")
    app = WritableLayer.create(
        workdir / "app.data",
        workdir / "app.index",
        VIRTUAL_SIZE,
        parent_uuid=base_uuid,
        uuid=_uuid(rng),
    )
    with app:
        _apply(app, model, [(512 * 1024, _text(MiB, rng)), (21 * MiB, rng.randbytes(8192))])
        app.trim(5 * MiB, MiB)
        model.trim(5 * MiB, MiB)
        app.flush()
        app_uuid = app.uuid
        commit_writable(app, workdir / "app.zfile", uuid=app_uuid, message="app", compress="zstd")
    say("   committed: app.zfile (ZFile zstd, 4 KiB blocks)")

    # 4. A writable layer on top, and the config that describes the stack.
    say("3. container layer: a writable layer on top, described by config.v1.json")
    upper = WritableLayer.create(
        workdir / "upper.data", workdir / "upper.index", VIRTUAL_SIZE, parent_uuid=app_uuid
    )
    upper.close()
    config = ImageConfig(
        lowers=[LowerConfig(file="base.tar"), LowerConfig(file="app.zfile")],
        upper=UpperConfig(data="upper.data", index="upper.index", vsize=VIRTUAL_SIZE >> 30),
        result_file="result.txt",
    )
    config_path = workdir / "config.v1.json"
    config.dump(config_path)

    # 5. Read the merged image back and compare.
    say("4. read the merged image back and compare with the model")
    with open_image(config_path, report_result=True) as image:
        write = _text(64 * 1024, rng)
        image.pwrite(30 * MiB, write)
        model.write(30 * MiB, write)
        image.flush()

        image_bytes = image.pread(0, image.size)
        matched = image_bytes == bytes(model.data)
        say(f"   {image.size:,} bytes, sha256 {hashlib.sha256(image_bytes).hexdigest()[:16]}...")
        say(f"   {'MATCH' if matched else 'MISMATCH'}: image and model")
        say("")
        say(str(image.segments(0, 22 * MiB).head(12).to_string(index=False)))

        say("")
        say("5. one traced 1 MiB read at 4.5 MiB: which layers served it")
        with recording() as trace, request("demo.read"):
            image.pread(4 * MiB + 512 * 1024, MiB)
        say(trace.summary().to_string())

    say("")
    say("6. what `workbench inspect` says of each file")
    for name in ("base.tar", "app.zfile", "upper.data", "config.v1.json"):
        say(render_text(describe(workdir / name)))
        say("")

    result = (workdir / "result.txt").read_text()
    say(f"resultFile says: {result}")

    say("")
    lazy_matched = _lazy_from_registry(workdir, model, say)
    return matched and lazy_matched and result == "success"


def _lazy_from_registry(workdir: Path, model: DiskModel, say: Callable[[str], None]) -> bool:
    """Push the committed layers to the embedded registry and read the image back lazily."""
    say("7. the same image from a registry: push the layers, read lazily through the cache")
    with EmbeddedRegistry(workdir / "registry") as registry:
        reference = ImageReference.parse(f"{registry.url.split('://', 1)[1]}/demo/app")
        blob_url = f"{registry.url}/v2/demo/app/blobs"
        with RegistrySession(workdir / "cache", readahead=False) as session:
            lowers = []
            for name in ("base.tar", "app.zfile"):
                data = (workdir / name).read_bytes()
                digest = session.run(session.client.push_blob, reference, data)
                lowers.append(LowerConfig(digest=digest, size=len(data)))
            say(f"   pushed {len(lowers)} layer blobs to {registry.url} (embedded registry)")

            remote = ImageConfig(
                repo_blob_url=blob_url,
                lowers=lowers,
                upper=UpperConfig(data="upper.data", index="upper.index"),
            )
            remote.dump(workdir / "remote.config.v1.json")
            blob_bytes = sum(lower.size for lower in lowers)

            with open_image(
                workdir / "remote.config.v1.json", upper="readonly", session=session
            ) as image:
                image.pread(4 * MiB, 2 * MiB)
                partial = session.cache.statistics().bytes_fetched
                say(
                    f"   a 2 MiB read fetched {partial:,} of {blob_bytes:,} blob bytes "
                    f"({100 * partial / blob_bytes:.0f}%): headers, indexes and the blocks read"
                )
                lazy_bytes = image.pread(0, image.size)

            statistics = session.cache.statistics()
            say(
                f"   whole disk read: {statistics.fetches} fetches, "
                f"{statistics.bytes_fetched:,} bytes fetched, {statistics.hits} cache hits"
            )

    matched = lazy_bytes == bytes(model.data)
    say(f"   {'MATCH' if matched else 'MISMATCH'}: lazily read image and model")
    return matched


def _uuid(rng: random.Random) -> str:
    """A reproducible random UUID (the demo's files are the same on every run)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def default_workdir() -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / "workbench-demo"
