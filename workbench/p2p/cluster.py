"""A batch cold start on real hosts: registry, P2P root, an agent and a device per host.

    with Cluster(workdir, hosts=4, mode="p2p", mbps=200) as cluster:
        results = cluster.start_all()             # every host mounts the image and reads
        cluster.registry_bytes()                  # what the registry served

`Cluster` builds a `HostNetwork` of one root host and N device hosts, runs the embedded
registry on the gateway address (in this process, so that it counts what it serves:
`BlobReads`; its egress to all hosts shaped to `registry_mbps`), pushes a sample image to it,
and starts per device host one process listening on the host's 127.0.0.1:`LOCAL_PORT`:

- mode ``"p2p"``: ``workbench p2p agent`` (its root, ``workbench p2p root``, runs on the root
  host, the one peer reading the registry);
- mode ``"direct"``: ``workbench shape`` as a plain TCP forwarder to the registry, so that each
  host's device reads the registry itself (the baseline).

A host's start (`start`) is a cold start of a device: ``workbench mount
127.0.0.1:LOCAL_PORT/REPO:TAG`` run inside the host (the FUSE server it leaves runs there too,
with its own empty block cache), then reading the image's start set (the files under ``app/``)
in full, timed from the mount command to the last byte.

The sample image (`make_sample_image`) is an ext4 of random (incompressible) files, as one
lz4 ZFile layer: ``app/`` (the files a start reads) and ``rest/`` (the bulk it never touches).

Caveats:
- a start here is mount + reads, not an application launch; there is no ready probe;
- the registry and the root share the machine with every host (2 cores): at more than a few
  hosts CPU, not the shaped links, bounds the times;
- everything is torn down on exit (mounts, processes, namespaces), also after a failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from workbench.errors import WorkbenchError
from workbench.p2p.hosts import Host, HostNetwork

__all__ = ["Cluster", "ClusterError", "StartResult", "make_sample_image"]

log = logging.getLogger(__name__)

MiB = 1 << 20
LOCAL_PORT = 7000
"""Each host's agent (or forwarder) listens at 127.0.0.1 and the host address on this port."""
READY_TIMEOUT = 30.0
REPOSITORY = "p2p/sample"
TAG = "v1"

Mode = Literal["p2p", "direct"]


class ClusterError(WorkbenchError, RuntimeError):
    """Raised when a peer, forwarder or device of the cluster does not start."""


@dataclass(frozen=True)
class StartResult:
    """One host's start: seconds from the mount command to the last byte of the start set."""

    host: int
    seconds: float
    mount_seconds: float
    bytes_read: int


def make_sample_image(
    folder: str | os.PathLike[str], *, app_mib: int = 6, rest_mib: int = 24, seed: int = 7
) -> Path:
    """A one-layer lz4 OverlayBD image of an ext4 with `app_mib` MiB of start files and
    `rest_mib` MiB of others; returns its config.v1.json (made once per folder).

    ``files.json`` beside it maps each file (``app/f00.bin``) to its sha256."""
    from workbench.image.commit import import_raw

    base = Path(folder)
    config = base / "config.v1.json"
    if config.exists():
        return config
    rng = np.random.default_rng(seed)
    tree = base / "tree"
    digests = {}
    for part, mib, pieces in (("app", app_mib, 8), ("rest", rest_mib, 8)):
        for number in range(pieces):
            path = tree / part / f"f{number:02d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = rng.integers(0, 256, mib * MiB // pieces, np.uint8).tobytes()
            path.write_bytes(data)
            digests[f"{part}/{path.name}"] = hashlib.sha256(data).hexdigest()
    (base / "files.json").write_text(json.dumps(digests, indent=1))
    raw = base / "disk.raw"
    with open(raw, "wb") as file:
        file.truncate((app_mib + rest_mib + 32) * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw)], check=True)
    import_raw(raw, base / "layer.tar", compress="lz4", tar=True)
    raw.unlink()
    shutil.rmtree(tree)
    config.write_text(f'{{"lowers": [{{"file": "{base / "layer.tar"}"}}]}}')
    return config


def _workbench() -> list[str]:
    script = Path(sys.executable).parent / "workbench"
    return [str(script)] if script.exists() else [sys.executable, "-c", _CLI_MAIN]


_CLI_MAIN = "import sys; from workbench.cli import main; sys.argv[0] = 'workbench'; main()"


class Cluster:
    """`hosts` hosts reading one image at once, through P2P or each from the registry.

    Parameters
    ----------
    workdir
        Scratch space: registry storage, caches, mount points, run state (removed on exit
        except the sample image under ``workdir/image``).
    mode
        ``"p2p"`` or ``"direct"`` (see the module docstring).
    mbps
        Rate of every host's link (both directions), None: unshaped.
    fanout
        Children per node of the P2P trees.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        hosts: int,
        *,
        mode: Mode = "p2p",
        mbps: float | None = None,
        registry_mbps: float | None = None,
        fanout: int = 4,
        app_mib: int = 6,
        rest_mib: int = 24,
    ) -> None:
        if mode not in ("p2p", "direct"):
            raise ValueError(f"mode {mode!r} is not 'p2p' or 'direct'")
        self.workdir = Path(workdir)
        self.mode = mode
        self.fanout = fanout
        self.registry_mbps = registry_mbps
        self.network = HostNetwork(
            hosts + 1, mbps=mbps, gateway_mbps=registry_mbps, run_dir=self.workdir / "run"
        )
        self.config = make_sample_image(self.workdir / "image", app_mib=app_mib, rest_mib=rest_mib)
        self.registry = None
        self.root_url: str | None = None
        self.agents: dict[int, subprocess.Popen] = {}
        self._root: subprocess.Popen | None = None
        self._mounts: list[tuple[Path, Path]] = []
        self._lock = threading.Lock()

    @property
    def hosts(self) -> list[Host]:
        """The device hosts (index 1..N)."""
        return self.network.hosts[1:]

    @property
    def root_host(self) -> Host:
        """The host of the P2P root (index 0; idle in mode "direct")."""
        return self.network.hosts[0]

    # Life cycle

    def __enter__(self) -> Cluster:
        self.network.__enter__()
        try:
            self._start_registry()
            if self.mode == "p2p":
                self._start_root()
            for host in self.hosts:
                self._start_local(host)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        from workbench.device.mount import unmount

        for mountpoint, run in self._mounts:
            try:
                unmount(mountpoint, run)
            except WorkbenchError as exc:
                log.warning("unmount %s: %s", mountpoint, exc)
        self._mounts.clear()
        self.network.close()  # stops the root and the agents too
        self._root = None
        if self.registry is not None:
            self.registry.stop()
            self.registry = None
        for scratch in ("caches", "mnt", "registry"):
            shutil.rmtree(self.workdir / scratch, ignore_errors=True)

    def _start_registry(self) -> None:
        from workbench.registry.image import push_image
        from workbench.registry.server import EmbeddedRegistry
        from workbench.registry.session import RegistrySession

        self.registry = EmbeddedRegistry(self.workdir / "registry", host=self.network.gateway)
        self.registry.start()
        address = f"{self.network.gateway}:{self.registry.port}"
        with RegistrySession(use_cache=False, insecure=(address,)) as session:
            push_image(self.config, f"{address}/{REPOSITORY}:{TAG}", session)
        self.registry.served.clear()

    def _start_root(self) -> None:
        host = self.root_host
        command = [
            *_workbench(), "p2p", "root", "--registry", self.registry.url,
            "--cache", str(self.workdir / "caches" / "root"),
            "--listen", f":{LOCAL_PORT}", "--advertise", f"http://{host.address}:{LOCAL_PORT}",
            "--fanout", str(self.fanout),
        ]  # fmt: skip
        self._root = host.popen(command, stdout=subprocess.PIPE, stderr=self._log("root"))
        self.root_url = _ready(self._root, "the p2p root").split()[-1]

    def _start_local(self, host: Host) -> None:
        if self.mode == "p2p":
            command = [
                *_workbench(), "p2p", "agent", "--root", self.root_url,
                "--cache", str(self.workdir / "caches" / f"agent{host.index}"),
                "--listen", f":{LOCAL_PORT}", "--advertise", f"http://{host.address}:{LOCAL_PORT}",
            ]  # fmt: skip
        else:
            upstream = f"{self.network.gateway}:{self.registry.port}"
            command = [*_workbench(), "shape", f"0.0.0.0:{LOCAL_PORT}", upstream]
        process = host.popen(command, stdout=subprocess.PIPE, stderr=self._log(host.name))
        self.agents[host.index] = process
        _ready(process, f"the {self.mode} endpoint of {host.name}")

    def _log(self, name: str) -> int:
        folder = self.workdir / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(folder / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    # Starting devices

    def start(self, host: Host, files: list[str] | None = None) -> StartResult:
        """Cold-start a device on `host`: mount the image through the host's endpoint, read
        `files` (default: the start set) in full."""
        started = time.perf_counter()
        mountpoint = self.mount(host)
        mounted = time.perf_counter()
        nbytes = self.read(mountpoint, files)
        done = time.perf_counter()
        return StartResult(host.index, done - started, mounted - started, nbytes)

    def mount(self, host: Host, trace: str | os.PathLike[str] | None = None) -> Path:
        """Mount the image on `host` through its endpoint (`trace`: record the mount's events
        to this Parquet file, written at unmount)."""
        mountpoint = self.workdir / "mnt" / f"h{host.index}"
        mountpoint.mkdir(parents=True, exist_ok=True)
        run = self.workdir / "run" / f"h{host.index}"
        env = {
            **os.environ,
            "WORKBENCH_CACHE_DIR": str(self.workdir / "caches" / f"dev{host.index}"),
        }
        reference = f"127.0.0.1:{LOCAL_PORT}/{REPOSITORY}:{TAG}"
        command = [*_workbench(), "mount", reference, str(mountpoint), "--run-dir", str(run)]
        if trace is not None:
            command += ["--trace", os.fspath(trace)]
        with self._lock:
            self._mounts.append((mountpoint, run))
        done = host.run(command, env=env)
        if done.returncode != 0:
            raise ClusterError(f"mount on {host.name} failed: {done.stderr.strip()[-400:]}")
        return mountpoint

    def unmount(self, host: Host) -> None:
        from workbench.device.mount import unmount

        mountpoint = self.workdir / "mnt" / f"h{host.index}"
        with self._lock:
            entry = next(entry for entry in self._mounts if entry[0] == mountpoint)
            self._mounts.remove(entry)
        unmount(*entry)

    def start_files(self, mountpoint: Path) -> list[str]:
        return sorted(str(path.relative_to(mountpoint)) for path in (mountpoint / "app").iterdir())

    def read(self, mountpoint: Path, files: list[str] | None = None) -> int:
        """Read `files` in full and check each against ``files.json``; returns the bytes."""
        expected = json.loads((self.config.parent / "files.json").read_text())
        nbytes = 0
        for name in files if files is not None else self.start_files(mountpoint):
            digest = hashlib.sha256()
            with open(mountpoint / name, "rb", buffering=0) as file:
                while chunk := file.read(1 << 20):
                    nbytes += len(chunk)
                    digest.update(chunk)
            if digest.hexdigest() != expected[name]:
                raise ClusterError(f"{mountpoint / name} read back wrong bytes (sha256 differs)")
        return nbytes

    def start_all(self) -> list[StartResult]:
        """Start every host at once; results in host order."""
        with ThreadPoolExecutor(len(self.hosts)) as pool:
            return list(pool.map(self.start, self.hosts))

    def kill_agent(self, index: int) -> None:
        """SIGKILL host `index`'s agent (a parent failing)."""
        self.network.hosts[index].stop(self.agents[index], sig=9)

    # Counters

    def block_counts(self, block_size: int = 256 << 10) -> dict[int, int]:
        """How often the registry served each `block_size` block of the image's layer."""
        assert self.registry is not None
        with open(self.config.parent / "layer.tar", "rb") as file:
            layer = "sha256:" + hashlib.file_digest(file, "sha256").hexdigest()
        counts: dict[int, int] = {}
        for digest, start, end in self.registry.served.reads:
            if digest != layer:
                continue  # the image config blob
            for block in range(start // block_size, -(-end // block_size)):
                counts[block] = counts.get(block, 0) + 1
        return counts

    def registry_bytes(self) -> int:
        assert self.registry is not None
        return self.registry.served.total()

    def blob_size(self) -> int:
        return (self.config.parent / "layer.tar").stat().st_size

    def summary(self, results: list[StartResult]) -> dict:
        return {
            "mode": self.mode,
            "hosts": len(self.hosts),
            "mbps": self.network.mbps,
            "registry_mbps": self.registry_mbps,
            "registry_bytes": self.registry_bytes(),
            "blob_bytes": self.blob_size(),
            "starts": [asdict(result) for result in results],
        }


def _ready(process: subprocess.Popen, what: str) -> str:
    """The first stdout line of `process`, which must say it is ready (else ClusterError)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT)
    line = process.stdout.readline().decode().strip() if ready else ""
    if not (line.startswith("ready") or line.startswith("shaping")):
        process.kill()
        raise ClusterError(f"{what} did not start within {READY_TIMEOUT:g} s (said {line!r})")
    return line


def record_trace(
    workdir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    mbps: float | None = None,
    registry_mbps: float | None = None,
    app_mib: int = 6,
    rest_mib: int = 24,
):
    """Record one host's cold start through its agent and save it as a `Trace` JSON."""
    import pandas as pd

    from workbench.p2p.sim import Trace

    workdir = Path(workdir)
    events_path = workdir / "start-events.parquet"
    with Cluster(
        workdir,
        1,
        mode="p2p",
        mbps=mbps,
        registry_mbps=registry_mbps,
        app_mib=app_mib,
        rest_mib=rest_mib,
    ) as cluster:
        host = cluster.hosts[0]
        cluster.read(cluster.mount(host, trace=events_path))
        cluster.unmount(host)
        blob_size = cluster.blob_size()
    trace = Trace.from_events(
        pd.read_parquet(events_path), blob_size=blob_size, name="sample image start"
    )
    trace.to_json(out)
    events_path.unlink()
    return trace
