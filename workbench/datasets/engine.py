"""The recipe engine: build a recipe's layers in order and write a multi-layer OCI image layout.

    path = build_image("redis")     # $WORKBENCH_DATASETS_DIR/images/redis, an OCI layout
                                    # (index.json names the manifest with ref.name "redis")

Each layer is built as the upper directory of an overlay mount over the trees of the layers
below it, inside ``unshare --mount --pid --fork``: every mount the build makes (the overlay,
/proc, /dev, a tmpfs on /tmp, the host's resolv.conf, apt's caches) lives in that private
mount namespace and every process it starts (a daemon a postinst starts despite
policy-rc.d) in that PID namespace, so both vanish when the step ends, whatever happened.
The steps of one layer, in order: ``files`` (written by Python into the upper directory,
parent directories resolved through the layers below, symlinks included), then one of
``debootstrap`` (minbase from the mirror apt already uses on this host), ``apt`` (apt-get
install --no-install-recommends in a chroot, with /usr/sbin/policy-rc.d refusing service
starts) and ``pip`` (the host's pip fetches wheels for the image's Python with --target
--platform --only-binary, then the image's python3 byte-compiles them), then ``run`` (the
image's /bin/sh -ec in a chroot). Then `layer.finalize` makes the tree reproducible and
`layer.write_layer` writes it as a tar+gzip blob.

The cache (``$WORKBENCH_DATASETS_DIR``, default ~/.cache/workbench/datasets):
- ``layers/<key>/``: ``tree/`` (the layer's upper directory, the lower of the layers above)
  and ``layer.json`` (digests, sizes, build time). The key hashes the parent's key and the
  layer's recipe table (with the bytes of its source files), so recipes that share a base
  share its layers: nginx, redis, postgres, ... reuse debian's;
- ``blobs/sha256/``: every blob, once; ``images/<name>/`` is an OCI layout whose blobs are
  hard links into it, and ``recipe.sha256`` the hash it was built from. An image whose
  hash matches is returned at once, without taking the lock;
- ``apt/`` and ``debs/``: apt's and debootstrap's package caches, bind-mounted into the
  builds (packages are downloaded once, and never land in a layer).
A build holds an exclusive lock on ``<cache>/.lock``; a failed step leaves its log under
``<cache>/tmp/`` and nothing else.

Caveats:
- needs root (mounts, chroot, unshare), overlayfs, and the network for debootstrap, apt and
  pip; the busybox recipe needs none of them but root;
- reproducible given the same mirror and PyPI state: apt and pip resolve versions when they
  run, so pin (``pkg=1.2``, ``numpy==2.2.6``) what must not move; the recipe hash does not
  see the mirror change, delete the cache (or the layer) to rebuild;
- the workload's mounts (/proc, /dev) are not in the image: a runtime provides them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workbench.datasets.layer import LayerBlob, finalize, write_layer
from workbench.datasets.recipe import (
    FileSpec,
    LayerSpec,
    Recipe,
    load_recipe,
    recipe_hash,
)
from workbench.errors import BuildError, RecipeError

__all__ = ["ENGINE_VERSION", "LayerRecord", "build_image", "default_cache_dir", "layer_key"]

log = logging.getLogger(__name__)

ENGINE_VERSION = "3"
"""Part of every layer key: bump it when a change to the engine changes what a layer holds."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
WORKLOAD_LABEL = "org.workbench.dataset.workload"
RECIPE_LABEL = "org.workbench.dataset.recipe"

CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOG_TAIL = 25
"""Lines of a failed step's output quoted in the error."""


@dataclass(frozen=True)
class LayerRecord:
    """A built layer as ``layer.json`` records it."""

    key: str
    comment: str
    recipe: str
    digest: str
    size: int
    diff_id: str
    tar_size: int
    entries: int
    seconds: float

    @classmethod
    def load(cls, path: Path) -> LayerRecord:
        return cls(**json.loads(path.read_text()))


def default_cache_dir() -> Path:
    """``$WORKBENCH_DATASETS_DIR``, else ~/.cache/workbench/datasets."""
    configured = os.environ.get("WORKBENCH_DATASETS_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "workbench" / "datasets"


def layer_key(parent: str, layer: LayerSpec) -> str:
    document = {"engine": ENGINE_VERSION, "parent": parent, "layer": layer.identity()}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def build_image(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    recipes: Path | None = None,
) -> Path:
    """Build recipe `name` (or find it cached) and return its OCI layout directory."""
    recipe = load_recipe(name, recipes)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wanted = recipe_hash(recipe)
    image_dir = cache / "images" / name
    if _is_built(image_dir, wanted):
        log.debug("dataset %s: cached at %s", name, image_dir)
        return image_dir

    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):
        if _is_built(image_dir, wanted):
            return image_dir
        _remove_leftovers(cache)
        started = time.monotonic()
        records = _build_layers(recipe, cache, progress)
        _write_layout(recipe, records, cache, image_dir, wanted)
    log.info("dataset %s: built in %.1f s at %s", name, time.monotonic() - started, image_dir)
    return image_dir


def _is_built(image_dir: Path, wanted: str) -> bool:
    stamp = image_dir / "recipe.sha256"
    try:
        return stamp.read_text().strip() == wanted and (image_dir / "index.json").is_file()
    except FileNotFoundError:
        return False


def _remove_leftovers(cache: Path) -> None:
    """What a killed build left (its work directory, a half-written blob); under the lock."""
    for work in sorted((cache / "tmp").glob("*")):
        if work.is_dir() and not (work / "build.log").exists():
            shutil.rmtree(work, ignore_errors=True)
        elif work.is_dir():
            for part in ("upper", "work", "merged"):
                shutil.rmtree(work / part, ignore_errors=True)
    for partial in (cache / "blobs" / "sha256").glob(".*.tmp*"):
        partial.unlink(missing_ok=True)
    for partial in (cache / "images").glob(".*.tmp-*"):
        shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# Layers


def _build_layers(recipe: Recipe, cache: Path, progress: bool) -> list[LayerRecord]:
    records: list[LayerRecord] = []
    trees: list[Path] = []  # top first
    parent = ""
    for position, spec in enumerate(recipe.all_layers):
        key = layer_key(parent, spec)
        layer_dir = cache / "layers" / key
        record_path = layer_dir / "layer.json"
        if record_path.is_file() and (layer_dir / "tree").is_dir():
            record = LayerRecord.load(record_path)
            _say(progress, f"{recipe.name}: layer {position} ({spec.comment}): cached")
        else:
            _say(progress, f"{recipe.name}: layer {position} ({spec.comment}): building")
            record = _build_layer(recipe.name, position, spec, key, trees, cache, progress)
            _say(
                progress,
                f"{recipe.name}: layer {position}: {record.tar_size / 2**20:.1f} MiB tar, "
                f"{record.size / 2**20:.1f} MiB gz, {record.entries} entries, "
                f"{record.seconds:.1f} s",
            )
        records.append(record)
        trees.insert(0, layer_dir / "tree")
        parent = key
    return records


def _build_layer(
    image: str,
    position: int,
    spec: LayerSpec,
    key: str,
    lowers: Sequence[Path],
    cache: Path,
    progress: bool,
) -> LayerRecord:
    started = time.monotonic()
    work = cache / "tmp" / f"{key[:16]}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    upper, overlay_work, merged = work / "upper", work / "work", work / "merged"
    for directory in (upper, overlay_work, merged):
        directory.mkdir(parents=True)
    where = f"dataset {image}: layer {position} ({spec.comment})"

    # Files go straight into the upper directory; the rest runs in a private namespace.
    try:
        for entry in spec.files:
            _write_file(entry, upper, lowers, where)
        script = _layer_script(spec, cache, upper, overlay_work, merged, lowers, where)
        if script:
            _run_step(script, work / "build.log", where, progress)
        finalize(upper, spec.epoch)
        blob = write_layer(upper, cache / "blobs" / "sha256", spec.epoch)
    except BaseException:
        # Keep the log of a failed step, nothing else.
        for directory in (upper, overlay_work, merged):
            shutil.rmtree(directory, ignore_errors=True)
        if not (work / "build.log").exists():
            shutil.rmtree(work, ignore_errors=True)
        raise
    record = _record(key, spec, blob, time.monotonic() - started)

    layer_dir = cache / "layers" / key
    shutil.rmtree(layer_dir, ignore_errors=True)
    layer_dir.mkdir(parents=True)
    upper.rename(layer_dir / "tree")
    (layer_dir / "layer.json").write_text(json.dumps(record.__dict__, indent=2) + "\n")
    shutil.rmtree(work)
    return record


def _record(key: str, spec: LayerSpec, blob: LayerBlob, seconds: float) -> LayerRecord:
    return LayerRecord(
        key=key,
        comment=spec.comment,
        recipe=spec.recipe,
        digest=blob.digest,
        size=blob.size,
        diff_id=blob.diff_id,
        tar_size=blob.tar_size,
        entries=blob.entries,
        seconds=round(seconds, 1),
    )


def _say(progress: bool, message: str) -> None:
    log.info("%s", message)
    if progress:
        print(message, file=sys.stderr, flush=True)


# The steps run in a private mount and PID namespace


def _layer_script(
    spec: LayerSpec,
    cache: Path,
    upper: Path,
    work: Path,
    merged: Path,
    lowers: Sequence[Path],
    where: str,
) -> str:
    """The shell script of a layer's namespace steps ("" when it has none)."""
    if spec.debootstrap is None and not spec.apt and spec.pip is None and spec.run is None:
        return ""
    root = merged if lowers else upper
    lines = ["set -eu", f"R={shlex.quote(str(root))}"]
    if lowers:
        for path in (*lowers, upper, work):
            if any(char in str(path) for char in ",:"):
                raise BuildError(f"{where}: the cache path {path} holds ',' or ':'; move it")
        options = (
            f"lowerdir={':'.join(str(p) for p in lowers)},upperdir={upper},workdir={work},"
            "redirect_dir=off,metacopy=off,index=off,xino=off"
        )
        lines.append(f'mount -t overlay overlay -o {shlex.quote(options)} "$R"')

    if spec.debootstrap is not None:
        lines += _debootstrap(spec.debootstrap, cache)
    lines += _chroot_setup(cache, spec.epoch)
    if spec.apt or spec.run is not None:
        lines.append(
            'inroot \'if [ -d /usr/sbin ]; then printf "#!/bin/sh\\nexit 101\\n" '
            "> /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; fi'"
        )
    if spec.apt:
        packages = " ".join(shlex.quote(p) for p in spec.apt)
        lines.append("inroot 'apt-get update -qq'")
        lines.append(
            shlex.join(["inroot", f"apt-get install -y -qq --no-install-recommends {packages}"])
        )
    if spec.pip is not None:
        lines += _pip(spec.pip)
    if spec.run is not None:
        lines.append(shlex.join(["inroot", spec.run]))
    if spec.apt or spec.run is not None:
        lines.append("inroot 'rm -f /usr/sbin/policy-rc.d'")
    return "\n".join(lines) + "\n"


def _debootstrap(options: dict[str, Any], cache: Path) -> list[str]:
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    mirror = options["mirror"] or host_mirror()
    argv = ["debootstrap", f"--variant={options['variant']}", f"--cache-dir={debs}"]
    if options["include"]:
        argv.append("--include=" + ",".join(options["include"]))
    argv += [options["suite"], "$R", mirror]
    return [" ".join(shlex.quote(a) if a != "$R" else '"$R"' for a in argv)]


def _chroot_setup(cache: Path, epoch: int) -> list[str]:
    """Mounts for the chroot (only where the root has the directory) and `inroot`."""
    apt_cache = cache / "apt"
    apt_cache.mkdir(parents=True, exist_ok=True)
    env = [
        f"PATH={CHROOT_PATH}",
        "HOME=/root",
        "LANG=C.UTF-8",
        "DEBIAN_FRONTEND=noninteractive",
        f"SOURCE_DATE_EPOCH={epoch}",
        "PYTHONHASHSEED=0",
        "TZ=UTC",
    ]
    return [
        'if [ -d "$R/proc" ]; then mount -t proc proc "$R/proc"; fi',
        'if [ -d "$R/dev" ]; then mount --rbind /dev "$R/dev"; fi',
        'if [ -d "$R/tmp" ]; then mount -t tmpfs tmpfs "$R/tmp"; fi',
        'if [ -f "$R/etc/resolv.conf" ] && [ ! -L "$R/etc/resolv.conf" ]; then '
        'mount --bind /etc/resolv.conf "$R/etc/resolv.conf"; fi',
        f'if [ -d "$R/var/cache/apt" ]; then mount --bind {shlex.quote(str(apt_cache))} '
        '"$R/var/cache/apt"; fi',
        'if [ -d "$R/var/lib/apt/lists" ]; then mount -t tmpfs tmpfs "$R/var/lib/apt/lists"; fi',
        f'inroot() {{ env -i {" ".join(env)} chroot "$R" /bin/sh -ec "$1"; }}',
    ]


def _pip(options: dict[str, Any]) -> list[str]:
    target = options["target"]
    argv = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-compile",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--target",
        "$R" + target,
        "--python-version",
        options["python"],
        "--implementation",
        "cp",
        "--only-binary=:all:",
    ]
    for platform in options["platforms"]:
        argv += ["--platform", platform]
    argv += options["packages"]
    pip = " ".join(
        '"$R"' + shlex.quote(a[2:]) if a.startswith("$R") else shlex.quote(a) for a in argv
    )
    return [
        pip,
        # Scripts pip writes for --target carry the host's interpreter; point them at the image's.
        f'if [ -d "$R"{shlex.quote(target)}/bin ]; then for f in "$R"{shlex.quote(target)}/bin/*; '
        'do if head -c 2 "$f" | grep -q "#!"; then '
        'sed -i "1s|^#!.*python.*$|#!/usr/bin/python3|" "$f"; fi; done; fi',
        shlex.join(["inroot", f"python3 -m compileall -q -j 0 {shlex.quote(target)}"]),
    ]


def _run_step(script: str, log_path: Path, where: str, progress: bool) -> None:
    """Run `script` in a private mount and PID namespace; raise `BuildError` if it fails."""
    argv = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"]
    argv += ["/bin/sh", "-c", script]
    env = {key: value for key, value in os.environ.items() if key.lower().endswith("_proxy")}
    env["PATH"] = os.environ.get("PATH", CHROOT_PATH)
    env["LANG"] = "C.UTF-8"
    log.debug("%s: running\n%s", where, script)
    with log_path.open("wb") as sink:
        sink.write(script.encode() + b"\n--- output ---\n")
        sink.flush()
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                sink.write(line)
                if progress:
                    sys.stderr.buffer.write(b"    " + line)
                    sys.stderr.flush()
            code = process.wait()
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        raise BuildError(
            f"{where}: the build step failed with exit code {code}; full log {log_path}; "
            "last lines:\n" + "\n".join(tail)
        )


def host_mirror() -> str:
    """The first Debian mirror apt uses on this host (deb822 sources, then sources.list)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == "deb":
                return next(p for p in parts[1:] if not p.startswith("["))
    return "http://deb.debian.org/debian"


# Files


def _write_file(entry: FileSpec, upper: Path, lowers: Sequence[Path], where: str) -> None:
    """Create `entry` in `upper`, its parent resolved through the layers (symlinks followed)."""
    parent = _resolve_dir(entry.path.rsplit("/", 1)[0], upper, lowers, where)
    _make_parents(parent, upper, lowers)
    target = upper / parent.lstrip("/") / entry.path.rsplit("/", 1)[1]
    below = _lookup(str(target.relative_to(upper)), upper, lowers)
    if not entry.dir and below is not None and below.is_dir() and not below.is_symlink():
        raise RecipeError(
            f"{where}: {entry.path} is a directory in the image; a file cannot replace it "
            "(remove it in an earlier layer's run, or pick another path)"
        )
    if target.is_symlink() or target.is_file():
        target.unlink()

    if entry.dir:
        target.mkdir(exist_ok=True)
        os.chmod(target, entry.mode if entry.mode is not None else 0o755)
    elif entry.symlink is not None:
        os.symlink(entry.symlink, target)
    else:
        data = entry.text.encode() if entry.text is not None else entry.source.read_bytes()
        target.write_bytes(data)
        default = 0o644 if entry.source is None else entry.source.stat().st_mode & 0o7777
        os.chmod(target, entry.mode if entry.mode is not None else default)
    os.chown(target, entry.uid, entry.gid, follow_symlinks=False)


def _resolve_dir(path: str, upper: Path, lowers: Sequence[Path], where: str) -> str:
    """`path` with every symlink resolved inside the image (as a chroot would)."""
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = "/".join((*resolved, part))
        found = _lookup(candidate, upper, lowers)
        if found is not None and found.is_symlink():
            hops += 1
            if hops > 40:
                raise RecipeError(f"{where}: too many symlinks resolving {path}")
            link = os.readlink(found)
            if link.startswith("/"):
                resolved = []
            parts = [p for p in link.split("/") if p] + parts
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)


def _lookup(relative: str, upper: Path, lowers: Sequence[Path]) -> Path | None:
    for tree in (upper, *lowers):
        candidate = tree / relative
        if candidate.is_symlink() or candidate.exists():
            return candidate
    return None


def _make_parents(directory: str, upper: Path, lowers: Sequence[Path]) -> None:
    """Create `directory` in `upper`, each new level with the mode and owner it has below."""
    current = upper
    relative = ""
    for part in [p for p in directory.split("/") if p]:
        relative = f"{relative}/{part}" if relative else part
        current = upper / relative
        if current.is_dir():
            continue
        current.mkdir()
        below = next((tree / relative for tree in lowers if (tree / relative).is_dir()), None)
        if below is not None:
            info = below.stat()
            os.chmod(current, info.st_mode & 0o7777)
            os.chown(current, info.st_uid, info.st_gid)


# The OCI layout


def _write_layout(
    recipe: Recipe, records: list[LayerRecord], cache: Path, image_dir: Path, wanted: str
) -> None:
    blobs = cache / "blobs" / "sha256"
    config = _image_config(recipe, records)
    config_digest = _put_blob(blobs, config)
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": r.digest, "size": r.size} for r in records
            ],
        }
    )
    manifest_digest = _put_blob(blobs, manifest)
    index = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "annotations": {REF_NAME: recipe.name},
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
    )

    # A fresh directory, renamed into place: a reader never sees half an image.
    tmp = image_dir.with_name(f".{image_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "blobs" / "sha256").mkdir(parents=True)
    digests = [config_digest, manifest_digest, *(r.digest for r in records)]
    for digest in digests:
        name = digest.split(":", 1)[1]
        _link(blobs / name, tmp / "blobs" / "sha256" / name)
    (tmp / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (tmp / "index.json").write_bytes(index)
    (tmp / "layers.json").write_text(json.dumps([r.__dict__ for r in records], indent=2) + "\n")
    (tmp / "recipe.sha256").write_text(wanted + "\n")
    shutil.rmtree(image_dir, ignore_errors=True)
    image_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(image_dir)


def _image_config(recipe: Recipe, records: list[LayerRecord]) -> bytes:
    workload = recipe.workload
    created = datetime.fromtimestamp(recipe.epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config: dict[str, Any] = {
        "Env": [f"{key}={value}" for key, value in workload.env.items()],
        "Cmd": list(workload.command),
        "WorkingDir": workload.workdir,
        "Labels": {
            RECIPE_LABEL: recipe.name,
            WORKLOAD_LABEL: json.dumps(workload.to_json(), sort_keys=True),
        },
    }
    if workload.ports:
        config["ExposedPorts"] = {f"{port}/tcp": {} for port in workload.ports}
    document = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [r.diff_id for r in records]},
        "history": [
            {
                "created": created,
                "created_by": f"workbench dataset {r.recipe}",
                "comment": r.comment,
            }
            for r in records
        ],
    }
    return _canonical(document)


def _canonical(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _put_blob(blobs: Path, data: bytes) -> str:
    blobs.mkdir(parents=True, exist_ok=True)
    hexdigest = hashlib.sha256(data).hexdigest()
    path = blobs / hexdigest
    if not path.exists():
        tmp = blobs / f".{hexdigest}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return f"sha256:{hexdigest}"


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
