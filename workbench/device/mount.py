"""Mounting an image: FUSE disk file -> loop device -> ext4, and tearing it all down again.

`mount_image` builds, in order, and records each piece in a state file as soon as it exists:

    1. a FUSE server: a child process ``python -m workbench.device.fuse CONFIG FUSE_DIR``
       (its own session, log in ``RUN_DIR/mounts/ID.log``) serving ``FUSE_DIR/disk``;
    2. a loop device on that file (``losetup --find --show``, ``--read-only`` for a
       read-only image; direct I/O stays off: fuse-ceiling.md "Best settings" 3);
    3. ext4 on the loop device at the mount point (``-o ro,noload`` for a read-only image,
       so that not even a journal replay writes).

State lives under `run_dir` (``$WORKBENCH_RUN_DIR``, default ``/run/workbench``)::

    RUN_DIR/mounts/ID.json   {"id", "mountpoint", "fuse_dir", "loop", "pid", "read_only", ...}
    RUN_DIR/mounts/ID.log    the server's log
    RUN_DIR/mounts/ID.sock   the server's introspection endpoint (`workbench.device.introspect`)
    RUN_DIR/fuse/ID/         the FUSE mount, holding ``disk``

`unmount` tears a mount down in the reverse order (ext4, loop, FUSE, server) and removes its
state; `unmount_all` does so for every recorded mount, and `cleanup_stale` for those whose
server has died (run at the start of every `mount_image`). Besides the state files, anything
that is ours by construction is swept too: FUSE mounts under ``RUN_DIR/fuse`` and loop
devices backed by a file there. Nothing else is touched.

Why a child process rather than a thread: pyfuse3 holds global state (one file system per
process), a child can be killed (kill -9 in the crash tests) without taking the caller with
it, and `workbench umount` from another process can stop it by pid.

Caveats:
- a LayerStack cannot be handed to a child process, so `mount_image` takes a config path;
- after the server dies, the ext4 mount sees I/O errors; its teardown falls back to a lazy
  unmount (``umount -l``), which detaches at once and lets the kernel drop it when idle;
- the server's pid is checked against its command line before it is signalled, so a
  recycled pid is never killed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.prefetch import PrefetchConfig

__all__ = [
    "DISK_NAME",
    "Mount",
    "MountError",
    "cleanup_stale",
    "default_run_dir",
    "find_mount",
    "list_mounts",
    "looks_like_reference",
    "mount_image",
    "unmount",
    "unmount_all",
]

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
"""Seconds to wait for the FUSE server to report it is mounted."""

STOP_TIMEOUT = 10.0
"""Seconds to wait for the server to exit after its FUSE mount is gone, before SIGKILL."""

SERVER_MODULE = "workbench.device.fuse"

SOCKET_PATH_MAX = 100
"""Longest control socket path used (sun_path holds 108 bytes with its NUL)."""

DISK_NAME = "disk"
"""The FUSE file system's one file. Defined here, not in the server module, so that mounting
and unmounting (and the CLI that imports them) work without importing pyfuse3."""


class MountError(WorkbenchError):
    """Raised when a mount cannot be made or found."""


@dataclass
class Mount:
    """One mounted image: what `mount_image` made, as recorded in its state file."""

    id: str
    mountpoint: str
    fuse_dir: str
    config: str
    writable_dir: str | None
    read_only: bool
    run_dir: str
    pid: int = 0
    loop: str = ""
    trace: str | None = None
    owner: int = 0
    """The process running `mount_image`; while it lives, an unfinished mount is not stale."""
    complete: bool = False
    control: str = ""
    """The server's introspection socket (`workbench.device.introspect`)."""
    metrics: str | None = None
    """The ``[HOST:]PORT`` metrics were asked on; `metrics_port` is the port bound."""
    metrics_port: int | None = None
    hang_threshold: float | None = None
    prefetch: dict[str, object] | None = None
    """The `PrefetchConfig` in force (mode resolved), as a dict."""
    cache_dir: str | None = None
    """The server's block cache folder (``$WORKBENCH_CACHE_DIR`` of the child); None: default."""

    @property
    def disk(self) -> str:
        return os.path.join(self.fuse_dir, DISK_NAME)

    @property
    def state_path(self) -> Path:
        return Path(self.run_dir) / "mounts" / f"{self.id}.json"

    def save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, self.state_path)


LAZY_READAHEAD_KB: Final = 128
"""Readahead of the loop device of an image read lazily from a registry (KiB).

The kernel gives a loop device on the FUSE disk 2,560 KiB, and every miss of it becomes a
registry fetch. Measured on the converted WordPress image (a start-like run of php, apache2
and mariadbd): 116 MB fetched at 2,560 KiB, 62 MB at 128 KiB, against 51 MB read by the same
run from the raw ext4 on a plain loop device at 128 KiB (104 MB at 2,560 KiB). 128 KiB is
also what a SCSI disk, OverlayBD's TCMU device, gets by default. Local images keep the
kernel's default, which tree walks over local data prefer."""


def default_run_dir() -> Path:
    return Path(os.environ.get("WORKBENCH_RUN_DIR", "/run/workbench"))


# Mounting ---------------------------------------------------------------------------------


def mount_image(
    image: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    writable_dir: str | os.PathLike[str] | None = None,
    *,
    read_only: bool | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    trace: str | os.PathLike[str] | None = None,
    prefetch: PrefetchConfig | None = None,
    metrics: str | None = None,
    hang_threshold: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    mkfs: Sequence[str] | None = None,
    mkfs_env: Mapping[str, str] | None = None,
    options: str = "",
) -> Mount:
    """Mount the ext4 file system of image `image` at `mountpoint`.

    `image` is a config.v1.json path or a registry reference (``host/name:tag``) of an
    OverlayBD image: a reference is resolved to a config of remote lowers
    (`workbench.registry.image.resolve_image`), kept in ``RUN_DIR/images/ID.json`` while
    mounted; its layers are then read lazily through the block cache.
    With `writable_dir` the image gets a writable layer there (created if the folder has
    none) and ext4 is mounted read-write; without it the image is read-only unless its
    config has an upper. `read_only` overrides the guess for a config with an upper. With
    `trace` the server records every event and writes them to that Parquet file when it
    stops (`workbench.device.fuse.main`). `cache_dir` gives the server its own block cache
    folder (a cache folder serves one process at a time, so concurrent mounts of remote
    images each need one); by default it uses `default_cache_dir()`.
    `prefetch` records or replays a trace, or prefetches a priority list
    (`workbench.prefetch.PrefetchConfig`; its ``auto`` mode is decided here, from the file).
    `metrics` serves Prometheus metrics on ``[HOST:]PORT`` (port 0: any free one, see
    ``Mount.metrics_port``); `hang_threshold` is the age in seconds at which a request in
    flight counts as hung (default 30).
    With `mkfs` (arguments of ``mkfs.ext4`` before
    the device, e.g. ``["-O", "^has_journal"]``) a new ext4 is made on the loop device first,
    as OverlayBD does for the bottom writable layer (`mkfs_env` is added to its environment,
    e.g. ``E2FSPROGS_FAKE_TIME``); `options` are extra mount options
    (``-o``), e.g. ``"noatime"``.
    Raises `MountError` (everything made so far is torn down again) if a step fails; when
    ext4 cannot be mounted, the message ends with the server's last log lines, which name
    the read that failed (blob, range, HTTP status or checksum).
    """
    run = Path(run_dir) if run_dir is not None else default_run_dir()
    cleanup_stale(run)
    if not isinstance(image, str | os.PathLike):
        raise TypeError(
            f"mount_image takes a config.v1.json path or a registry reference, got "
            f"{type(image).__name__}; the FUSE server runs in a child process and opens the "
            "image itself"
        )
    mount_id = uuid.uuid4().hex[:12]
    config = _config_of(image, run / "images" / f"{mount_id}.json")
    if read_only is None:
        read_only = writable_dir is None and not _config_has_upper(config)

    fuse_dir = run / "fuse" / mount_id
    fuse_dir.mkdir(parents=True)
    mount = Mount(
        id=mount_id,
        mountpoint=os.path.realpath(mountpoint),
        fuse_dir=str(fuse_dir),
        config=config,
        writable_dir=os.path.abspath(writable_dir) if writable_dir is not None else None,
        read_only=read_only,
        run_dir=str(run),
        trace=os.path.abspath(trace) if trace is not None else None,
        owner=os.getpid(),
        control=_control_path(run, mount_id),
        metrics=metrics,
        hang_threshold=hang_threshold,
        prefetch=asdict(prefetch.resolved()) if prefetch is not None else None,
        cache_dir=os.path.abspath(cache_dir) if cache_dir is not None else None,
    )
    mount.save()
    try:
        mount.pid = _start_server(mount)
        mount.save()
        mount.loop = _attach_loop(mount.disk, read_only)
        mount.save()
        if _config_has_remote_lowers(config):
            _set_loop_readahead(mount.loop, LAZY_READAHEAD_KB)
        if mkfs is not None:
            env = {**os.environ, **(mkfs_env or {})}
            _run(["mkfs.ext4", "-q", "-F", *mkfs, mount.loop], "make ext4", env)
        try:
            _mount_ext4(mount.loop, mount.mountpoint, read_only, options)
        except MountError as exc:
            log_path = Path(mount.run_dir) / "mounts" / f"{mount.id}.log"
            raise MountError(f"{exc}; the FUSE server's log: {_tail(log_path)}") from exc
        mount.complete = True
        mount.save()
        if mount.prefetch is not None and mount.prefetch["mode"] == "list":
            _prefetch_list(mount)
    except BaseException:
        _teardown(mount)
        raise
    log.info("mounted %s at %s (%s, %s)", config, mount.mountpoint, mount.loop, mount.fuse_dir)
    return mount


def _config_of(image: str | os.PathLike[str], resolved: Path) -> str:
    """The config path of `image`: itself if it is a file, else a reference resolved there."""
    if os.path.isfile(image):
        return os.path.abspath(image)

    from workbench.errors import ImageReferenceError
    from workbench.registry.image import write_image_config

    text = os.fspath(image)
    if text.endswith(".json") or not looks_like_reference(text):
        raise MountError(
            f"{text}: no such config.v1.json file; IMAGE is a config.v1.json path or a "
            "registry reference host[:port]/name[:tag]"
        )
    resolved.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_image_config(text, resolved)
    except ImageReferenceError as exc:
        raise MountError(
            f"{text} is neither a config.v1.json file nor a registry reference "
            f"(host[:port]/name[:tag]): {exc}"
        ) from exc
    return str(resolved)


def looks_like_reference(text: str) -> bool:
    """Whether `text` reads as a registry reference rather than a file path.

    A reference names a registry host first (with a dot or a port, or localhost); a relative
    path such as images/app/config.v1.json does not.
    """
    host = text.split("/", 1)[0]
    return "." in host or ":" in host or host == "localhost"


def _config_has_upper(config: str) -> bool:
    from workbench.formats.config import ImageConfig

    return not ImageConfig.load(config).upper.is_empty


def _config_has_remote_lowers(config: str) -> bool:
    from workbench.formats.config import ImageConfig

    return any(lower.digest and not lower.file for lower in ImageConfig.load(config).lowers)


def _set_loop_readahead(loop: str, kb: int) -> None:
    """Set the loop device's readahead; a failure costs bytes, not correctness (logged)."""
    knob = Path("/sys/block") / os.path.basename(loop) / "queue" / "read_ahead_kb"
    try:
        knob.write_text(str(kb))
    except OSError as exc:
        log.warning("could not set the readahead of %s to %d KiB: %s", loop, kb, exc)


def _control_path(run: Path, mount_id: str) -> str:
    """``RUN/mounts/ID.sock``, or ``/tmp/workbench-ID.sock`` where that path is too long for a
    unix socket address (108 bytes; deep test folders)."""
    path = os.path.abspath(run / "mounts" / f"{mount_id}.sock")
    return path if len(path.encode()) < SOCKET_PATH_MAX else f"/tmp/workbench-{mount_id}.sock"


def _prefetch_list(mount: Mount) -> None:
    """Resolve the mount's priority list to disk ranges and hand them to its server."""
    from workbench.device.introspect import query
    from workbench.prefetch.filelist import read_list, resolve_extents

    assert mount.prefetch is not None
    paths = read_list(str(mount.prefetch["trace"]))
    ranges = resolve_extents(mount.mountpoint, paths)
    query(mount.control, "prefetch-ranges", ranges=ranges)
    log.info("prefetching %d ranges of %d listed paths", len(ranges), len(paths))


def _server_command(mount: Mount) -> list[str]:
    command = [sys.executable, "-m", SERVER_MODULE, mount.config, mount.fuse_dir]
    command += ["--name", f"workbench-{mount.id}", "--control", mount.control]
    if mount.writable_dir is not None:
        command += ["--writable", mount.writable_dir]
    if mount.trace is not None:
        command += ["--trace", mount.trace]
    if mount.metrics is not None:
        command += ["--metrics", mount.metrics]
    if mount.hang_threshold is not None:
        command += ["--hang-threshold", str(mount.hang_threshold)]
    prefetch = mount.prefetch
    if prefetch is not None and prefetch["mode"] in ("record", "replay"):
        command += [f"--{prefetch['mode']}-trace", str(prefetch["trace"])]
    if prefetch is not None:
        command += ["--prefetch-concurrency", str(prefetch["concurrency"])]
    return command


def _start_server(mount: Mount) -> int:
    command = _server_command(mount)
    log_path = Path(mount.run_dir) / "mounts" / f"{mount.id}.log"
    environment = None
    if mount.cache_dir is not None:
        environment = {**os.environ, "WORKBENCH_CACHE_DIR": mount.cache_dir}
    with open(log_path, "ab") as log_file:
        server = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=environment,
        )
    mount.pid = server.pid
    mount.save()

    assert server.stdout is not None
    line = _read_line(server, READY_TIMEOUT)
    server.stdout.close()
    words = line.split()
    if not words or words[0] != b"ready":
        server.kill()
        server.wait()
        raise MountError(
            f"the FUSE server for {mount.config} did not start (exit {server.returncode}); "
            f"its log: {_tail(log_path)}"
        )
    for word in words[1:]:
        if word.startswith(b"metrics="):
            mount.metrics_port = int(word.split(b"=", 1)[1])
    # The child outlives this Popen object: teardown finds it again by pid.
    server.returncode = 0
    return server.pid


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> bytes:
    import select

    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline() if ready else b""


def _tail(path: Path, lines: int = 5) -> str:
    """What the server's log says last: the error line that ends a traceback if there is one
    (``module.SomeError: message``, which names the failed read), else the last lines."""
    try:
        logged = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    for line in reversed(logged):
        if _ERROR_LINE.match(line):
            return line
    return " | ".join(logged[-lines:])


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\w*: ")


def _attach_loop(disk: str, read_only: bool) -> str:
    command = ["losetup", "--find", "--show", *(["--read-only"] if read_only else []), disk]
    return _run(command, "attach a loop device").strip()


def _mount_ext4(loop: str, mountpoint: str, read_only: bool, extra: str = "") -> None:
    given = ",".join(part for part in ("ro,noload" if read_only else "", extra) if part)
    options = ["-o", given] if given else []
    _run(["mount", "-t", "ext4", *options, loop, mountpoint], "mount ext4")


def _run(command: list[str], what: str, env: Mapping[str, str] | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise MountError(f"could not {what}: {' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


# Listing and tearing down ---------------------------------------------------------------------


def list_mounts(run_dir: str | os.PathLike[str] | None = None) -> list[Mount]:
    """Every mount recorded under `run_dir` (unreadable state files are logged and skipped)."""
    run = Path(run_dir) if run_dir is not None else default_run_dir()
    mounts = []
    for path in sorted((run / "mounts").glob("*.json")):
        try:
            mounts.append(Mount(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("skipping unreadable mount state %s: %s", path, exc)
    return mounts


def find_mount(
    mountpoint: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None
) -> Mount:
    """The workbench mount at `mountpoint`; `MountError` if there is none."""
    target = os.path.realpath(mountpoint)
    for mount in list_mounts(run_dir):
        if mount.mountpoint == target:
            return mount
    raise MountError(
        f"{target} is not a workbench mount (no state under {run_dir or default_run_dir()}); "
        "`workbench umount --all` removes whatever the workbench left behind"
    )


def unmount(
    mountpoint: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None
) -> Mount:
    """Tear down the mount at `mountpoint`: ext4, loop device, FUSE, server, state."""
    mount = find_mount(mountpoint, run_dir)
    _teardown(mount)
    return mount


def unmount_all(run_dir: str | os.PathLike[str] | None = None) -> list[Mount]:
    """Tear down every workbench mount, then sweep leftovers of ours without state."""
    run = Path(run_dir) if run_dir is not None else default_run_dir()
    mounts = list_mounts(run)
    for mount in mounts:
        _teardown(mount)
    _sweep(run)
    return mounts


def cleanup_stale(run_dir: str | os.PathLike[str] | None = None) -> list[Mount]:
    """Tear down the mounts whose server has died (a crash), and sweep orphaned pieces.

    A mount another process is still making (not complete, its owner alive) is left alone,
    even before its server has started.
    """
    run = Path(run_dir) if run_dir is not None else default_run_dir()
    stale = [mount for mount in list_mounts(run) if _is_stale(mount)]
    for mount in stale:
        log.warning(
            "removing stale mount %s at %s (server %d gone)", mount.id, mount.mountpoint, mount.pid
        )
        _teardown(mount)
    _sweep(run, live={mount.fuse_dir for mount in list_mounts(run)})
    return stale


def _is_stale(mount: Mount) -> bool:
    if not mount.complete and mount.owner != os.getpid() and _is_alive(mount.owner):
        return False
    return not _is_server(mount.pid)


def _is_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _teardown(mount: Mount) -> None:
    """Undo every piece of `mount` that exists, last made first; never raises for a gone piece."""
    if mount.loop and _mounted_source(mount.mountpoint) == mount.loop:
        _unmount_path(mount.mountpoint)
    if mount.loop and _loop_backing(mount.loop) == mount.disk:
        _detach_loop(mount.loop)
    if _is_mounted(mount.fuse_dir):
        subprocess.run(["fusermount3", "-u", "-z", mount.fuse_dir], capture_output=True)
    _stop_server(mount.pid)
    resolved = Path(mount.run_dir) / "images" / f"{mount.id}.json"
    if mount.config == str(resolved):
        resolved.unlink(missing_ok=True)
    for path in (mount.state_path, mount.state_path.with_suffix(".log")):
        path.unlink(missing_ok=True)
    if mount.control:
        Path(mount.control).unlink(missing_ok=True)
    try:
        os.rmdir(mount.fuse_dir)
    except OSError:
        pass
    log.info("unmounted %s (%s)", mount.mountpoint, mount.id)


def _sweep(run: Path, live: frozenset[str] | set[str] = frozenset()) -> None:
    """Remove FUSE mounts under ``run/fuse`` and loop devices on them not in `live`."""
    fuse_root = str(run / "fuse") + "/"
    for loop, backing in _loop_devices():
        if backing.startswith(fuse_root) and os.path.dirname(backing) not in live:
            for target in _mounts_of(loop):
                _unmount_path(target)
            _detach_loop(loop)
    for _source, target in _proc_mounts():
        if target.startswith(fuse_root) and target not in live:
            subprocess.run(["fusermount3", "-u", "-z", target], capture_output=True)
            try:
                os.rmdir(target)
            except OSError:
                pass


def _unmount_path(target: str) -> None:
    done = subprocess.run(["umount", target], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("umount %s failed (%s); detaching it lazily", target, done.stderr.strip())
        subprocess.run(["umount", "-l", target], capture_output=True)


def _detach_loop(loop: str) -> None:
    done = subprocess.run(["losetup", "-d", loop], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("losetup -d %s failed: %s", loop, done.stderr.strip())


def _stop_server(pid: int) -> None:
    """Wait for the server to exit (its FUSE mount is gone); SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + STOP_TIMEOUT
    for signum in (None, signal.SIGTERM, signal.SIGKILL):
        if signum is not None and _is_server(pid):
            os.kill(pid, signum)
        while _is_server(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _is_server(pid):
            return
        deadline = time.monotonic() + STOP_TIMEOUT / 2


def _is_server(pid: int) -> bool:
    """True if `pid` is alive and is a FUSE server of ours (not a recycled pid, not a zombie)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            state = stat_file.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            command = cmdline.read()
    except OSError:
        return False
    if state == b"Z":
        _reap(pid)
        return False
    return SERVER_MODULE.encode() in command


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _proc_mounts() -> list[tuple[str, str]]:
    with open("/proc/self/mounts") as mounts:
        return [
            (fields[0], _unescape(fields[1]))
            for fields in (line.split() for line in mounts)
            if len(fields) >= 2
        ]


def _unescape(path: str) -> str:
    return path.encode().decode("unicode_escape") if "\\" in path else path


def _is_mounted(target: str) -> bool:
    return any(mounted == target for _, mounted in _proc_mounts())


def _mounted_source(target: str) -> str | None:
    sources = [source for source, mounted in _proc_mounts() if mounted == target]
    return sources[-1] if sources else None


def _mounts_of(device: str) -> list[str]:
    return [target for source, target in _proc_mounts() if source == device]


def _loop_devices() -> list[tuple[str, str]]:
    """(device, backing file) of every attached loop device."""
    devices = []
    for block in Path("/sys/block").glob("loop*"):
        backing = _loop_backing(f"/dev/{block.name}")
        if backing:
            devices.append((f"/dev/{block.name}", backing))
    return devices


def _loop_backing(loop: str) -> str:
    try:
        return (
            (Path("/sys/block") / os.path.basename(loop) / "loop" / "backing_file")
            .read_text()
            .strip()
        )
    except OSError:
        return ""
