"""Hosts on one machine: network namespaces on a bridge, with a shaped link each.

    with HostNetwork(4, mbps=200) as net:           # 4 namespaces, 200 Mbit/s per link
        net.gateway                                   # "10.X.Y.1": the root namespace's side
        agent = net.hosts[0].popen(["workbench", "p2p", "agent", ...])
        net.hosts[1].run(["curl", ...])

Layout. One Linux bridge in the root namespace holds the gateway address ``10.X.Y.1/24``;
host i is a network namespace with a veth pair, ``eth0`` inside (``10.X.Y.(10+i)``) and the
other end on the bridge, plus its own ``lo`` (so a device in the namespace reaches its host's
agent at 127.0.0.1). Processes in a host are started with ``nsenter --net``: they share the
machine's mount namespace (unlike ``ip netns exec``), so a mount made by a device in a host is
visible to, and torn down by, the caller.

Shaping. With `mbps` each link gets a token bucket filter (``tc qdisc ... tbf``) on both ends:
on ``eth0`` (the host's upload) and on its bridge port (the host's download). With
`gateway_mbps` the bridge device itself is shaped: what the root namespace (a registry there)
sends to all hosts together; traffic between hosts does not pass it. There is no
netem on this kernel; tbf's latency is a queue bound, not a delay, so links add no RTT.

Names. Every object carries the prefix ``wbp2p`` and a 4-hex-digit tag of the run: namespaces
``wbp2p-TAG-hI``, the bridge ``wbp2pTAGbr``, bridge ports ``wbp2pTAGvI``. A state file
``RUN_DIR/p2p-hosts/TAG.json`` records them with the owner's pid; `cleanup_stale` removes the
objects of runs whose owner died, and nothing without such a record.

Teardown (on exit, error or not): processes started through a host are stopped (SIGTERM, then
SIGKILL, each by its pid and process group), then the namespaces (taking their veth pairs with
them), then the bridge, then the state file. A failure while building tears down what exists.

Caveats:
- needs root, iproute2 and util-linux's nsenter; the subnet is picked at random among
  ``10.200.0.0/16``-``10.249.255.0/24`` and checked against the routing table only;
- the bridge sees the machine's iptables (br_netfilter): a FORWARD policy of DROP would cut
  the hosts off each other (checked at start, refused with a message).
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workbench.device.mount import _is_alive
from workbench.errors import WorkbenchError

__all__ = ["PREFIX", "Host", "HostNetwork", "HostNetworkError", "cleanup_stale", "leftovers"]

log = logging.getLogger(__name__)

PREFIX = "wbp2p"
STOP_TIMEOUT = 5.0
"""Seconds a process gets to exit after SIGTERM before SIGKILL."""


class HostNetworkError(WorkbenchError, OSError):
    """Raised when the namespaces, links or shaping cannot be made."""


def _run(command: Sequence[str], what: str) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True)
    if done.returncode != 0:
        raise HostNetworkError(f"could not {what}: {' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


def _state_dir(run_dir: str | os.PathLike[str] | None) -> Path:
    base = Path(run_dir) if run_dir else Path(os.environ.get("WORKBENCH_RUN_DIR", "/run/workbench"))
    return base / "p2p-hosts"


@dataclass
class Host:
    """One namespace: its name, its address, and the processes started in it."""

    name: str
    address: str
    index: int
    processes: list[subprocess.Popen] = field(default_factory=list)

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` as run inside this host's network namespace."""
        return ["nsenter", f"--net=/run/netns/{self.name}", "--", *argv]

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start `argv` in the host (its own process group); stopped at teardown."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        process = subprocess.Popen(self.command(argv), start_new_session=True, **kw)
        self.processes.append(process)
        return process

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run `argv` in the host to completion (``capture_output`` and ``text`` default on)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(argv), **kw)

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
        """Stop one process of this host by its pid (and its group); returns its exit code."""
        if process.poll() is None:
            _signal_group(process.pid, sig)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        return process.returncode

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            self.stop(process)
        self.processes.clear()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session made the pid its group's id
    except ProcessLookupError:
        pass


class HostNetwork:
    """`count` hosts on one bridge, each link shaped to `mbps` (None: unshaped)."""

    def __init__(
        self,
        count: int,
        *,
        mbps: float | None = None,
        gateway_mbps: float | None = None,
        burst_bytes: int = 256 << 10,
        run_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"count {count} must be at least 1 host")
        if mbps is not None and mbps <= 0:
            raise ValueError(f"mbps {mbps} must be positive, or None for unshaped links")
        self.count = count
        self.mbps = mbps
        self.gateway_mbps = gateway_mbps
        self.burst_bytes = burst_bytes
        self.tag = secrets.token_hex(2)
        self.bridge = f"{PREFIX}{self.tag}br"
        self.subnet = ""
        self.gateway = ""
        self.hosts: list[Host] = []
        self._state = _state_dir(run_dir) / f"{self.tag}.json"
        self._made_bridge = False

    # Life cycle

    def __enter__(self) -> HostNetwork:
        _require_tools()
        cleanup_stale(self._state.parent)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        self.subnet = _free_subnet()
        self.gateway = f"{self.subnet}.1"
        self._save()

        _run(["ip", "link", "add", "name", self.bridge, "type", "bridge"], "make the bridge")
        self._made_bridge = True
        _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge], "address the bridge")
        _run(["ip", "link", "set", self.bridge, "up"], "bring the bridge up")
        if self.gateway_mbps is not None:
            self._shape(["tc"], self.bridge, self.gateway_mbps)

        for index in range(self.count):
            host = Host(f"{PREFIX}-{self.tag}-h{index}", f"{self.subnet}.{10 + index}", index)
            self.hosts.append(host)
            self._save()
            self._add_host(host)
        log.info(
            "%d hosts on %s (%s.0/24), links %s",
            self.count,
            self.bridge,
            self.subnet,
            f"{self.mbps:g} Mbit/s" if self.mbps else "unshaped",
        )

    def _add_host(self, host: Host) -> None:
        port = f"{PREFIX}{self.tag}v{host.index}"
        _run(["ip", "netns", "add", host.name], f"make namespace {host.name}")
        _run(
            ["ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.name],
            f"link {host.name}",
        )
        _run(["ip", "link", "set", port, "master", self.bridge, "up"], f"attach {port}")
        inside = ["ip", "-n", host.name]
        _run([*inside, "addr", "add", f"{host.address}/24", "dev", "eth0"], "address eth0")
        _run([*inside, "link", "set", "eth0", "up"], "bring eth0 up")
        _run([*inside, "link", "set", "lo", "up"], "bring lo up")
        _run([*inside, "route", "add", "default", "via", self.gateway], "route via the gateway")
        if self.mbps is not None:
            self._shape(["tc"], port, self.mbps)
            self._shape(["tc", "-n", host.name], "eth0", self.mbps)

    def _shape(self, tc: list[str], device: str, mbps: float) -> None:
        rate = f"{mbps * 1000:.0f}kbit"
        _run(
            [*tc, "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate,
             "burst", str(self.burst_bytes), "latency", "200ms"],
            f"shape {device} to {rate}",
        )  # fmt: skip

    def close(self) -> None:
        """Stop every process, remove the namespaces, the bridge and the state file."""
        errors = []
        for host in self.hosts:
            host.stop_all()
        for host in self.hosts:
            port = f"{PREFIX}{self.tag}v{host.index}"
            if _link_exists(port):  # deleting one end removes the pair at once
                subprocess.run(["ip", "link", "del", port], capture_output=True)
            if _netns_exists(host.name):
                done = subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
                if done.returncode != 0:
                    errors.append(f"{host.name}: {done.stderr.decode().strip()}")
        if self._made_bridge and _link_exists(self.bridge):
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        self.hosts = []
        self._made_bridge = False
        self._state.unlink(missing_ok=True)
        if errors:
            log.warning("teardown of %s left: %s", self.tag, "; ".join(errors))

    def _save(self) -> None:
        self._state.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "tag": self.tag,
            "owner": os.getpid(),
            "bridge": self.bridge,
            "namespaces": [host.name for host in self.hosts],
        }
        self._state.write_text(json.dumps(record))


# Checks and cleanup --------------------------------------------------------------------------


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise HostNetworkError("network namespaces need root; run as root")
    missing = [tool for tool in ("ip", "tc", "nsenter") if shutil.which(tool) is None]
    if missing:
        raise HostNetworkError(f"{', '.join(missing)} missing; install iproute2 and util-linux")
    if shutil.which("iptables") is None:
        return
    forward = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True)
    if "-P FORWARD DROP" in forward.stdout:
        raise HostNetworkError(
            "iptables FORWARD policy is DROP, which cuts bridged hosts off; allow forwarding"
        )


def _free_subnet() -> str:
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for _ in range(100):
        subnet = f"10.{random.randint(200, 249)}.{random.randint(0, 255)}"
        if f"{subnet}." not in routes:
            return subnet
    raise HostNetworkError("no free 10.200-249.x.0/24 subnet; remove old routes")


def _netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def cleanup_stale(state_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove the namespaces and bridges of runs whose owner died; returns what was removed."""
    folder = Path(state_dir) if state_dir is not None else _state_dir(None)
    removed = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _is_alive(int(record.get("owner", 0))):
            continue
        tag = str(record.get("tag", ""))
        for name in record.get("namespaces", []):
            if name.startswith(f"{PREFIX}-{tag}-") and _netns_exists(name):
                _kill_namespace_processes(name)
                port = f"{PREFIX}{tag}v{name.rsplit('-h', 1)[-1]}"
                if _link_exists(port):
                    subprocess.run(["ip", "link", "del", port], capture_output=True)
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
                removed.append(name)
        bridge = record.get("bridge", "")
        if bridge.startswith(PREFIX) and _link_exists(bridge):
            subprocess.run(["ip", "link", "del", bridge], capture_output=True)
            removed.append(bridge)
        path.unlink(missing_ok=True)
    return removed


def _kill_namespace_processes(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    time.sleep(0.1)


def leftovers(tag: str | None = None) -> list[str]:
    """Namespaces and links of ours (prefix, and `tag` if given) that exist now."""
    start = f"{PREFIX}-{tag}-" if tag else f"{PREFIX}-"
    names = (
        [name for name in os.listdir("/run/netns") if name.startswith(start)]
        if os.path.isdir("/run/netns")
        else []
    )
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    link_start = f"{PREFIX}{tag}" if tag else PREFIX
    for line in links.splitlines():
        parts = line.split(": ")
        if len(parts) > 1 and parts[1].split("@")[0].startswith(link_start):
            names.append(parts[1].split("@")[0])
    return names
