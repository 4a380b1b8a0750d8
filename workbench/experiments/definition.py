"""Experiment definitions: one TOML file per study, parsed and checked before anything runs.

A definition names what to vary and how often; the runner (`workbench.experiments.runner`)
turns it into trials. Example (``experiments/fig14-cold-start.toml``)::

    name = "fig14-cold-start"
    kind = "startup"                       # startup | device | sizes
    figure = "Fig 14"
    description = "cold start: .tgz + overlayfs vs lazy from the registry"
    workloads = ["standin-python"]
    systems = ["tgz-overlayfs", "lazy"]
    networks = ["datacenter", "cloud-vm"]  # workbench.net.shape.PRESETS, or "none"
    disks = ["local"]                      # DISK_PRESETS
    cache = ["cold"]                       # cold | warm
    repetitions = 5
    order = "interleaved"                  # interleaved | blocked | shuffled
    seed = 14
    timeout_s = 120

    [quick]                                # overrides under --quick
    repetitions = 1
    networks = ["cloud-vm"]

    [device]                               # kind = "device" only
    queue_depths = [1, 8, 32, 128]
    block_size = "8k"
    runtime_s = 5
    walks = ["du", "tar"]

Every key is checked: an unknown key, an unknown system, preset, cache state or order, a
repetition count below one, or a wrong type raises `DefinitionError` naming the file, the key,
the value and what is allowed. Nothing is run for a bad definition.

Caveats:
- a system another part of the workbench has not built yet (``lazy-prefetch`` until trace
  prefetch exists) is accepted and reported unavailable at run time, not rejected here;
- workload names are checked when the run starts (they may name stand-ins or datasets).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from workbench.errors import DefinitionError
from workbench.net.shape import PRESETS

__all__ = [
    "CACHE_STATES",
    "DISK_PRESETS",
    "KINDS",
    "ORDERS",
    "SYSTEMS",
    "Definition",
    "DefinitionError",
    "DeviceSettings",
    "DiskPreset",
    "load_definition",
]


@dataclass(frozen=True)
class DiskPreset:
    """A disk as blkio throttling models it: IOPS and bytes per second, read and write."""

    name: str
    iops: int | None
    bytes_per_s: int | None
    source: str


DISK_PRESETS: Final[dict[str, DiskPreset]] = {
    "local": DiskPreset("local", None, None, "this machine's disk, unthrottled"),
    "cloud-disk": DiskPreset(
        "cloud-disk",
        iops=2000,
        bytes_per_s=100_000_000,
        source="paper §6 setup [S]: a cloud disk throttled to 2,000 IOPS / 100 MB/s",
    ),
}

SYSTEMS: Final[dict[str, str]] = {
    "tgz-overlayfs": "the Docker way: fetch .tar.gz layers, gunzip + untar each, overlayfs",
    "lazy": "the OverlayBD image mounted lazily through the block cache, overlayfs on top",
    "lazy-warm": "lazy, with the block cache kept from a previous start",
    "lazy-prefetch": "lazy, with a recorded trace replayed at start (trace prefetch)",
    "plain-loop": "device studies: the same ext4 image on a plain loop device",
}
STARTUP_SYSTEMS: Final = ("tgz-overlayfs", "lazy", "lazy-warm", "lazy-prefetch")
DEVICE_SYSTEMS: Final = ("plain-loop", "lazy", "lazy-warm")

KINDS: Final = ("startup", "device", "sizes")
CACHE_STATES: Final = ("cold", "warm")
ORDERS: Final = ("interleaved", "blocked", "shuffled")
WALKS: Final = ("du", "tar")


@dataclass(frozen=True)
class DeviceSettings:
    """What a device study runs on each side: fio random reads per queue depth, tree walks."""

    queue_depths: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    block_size: str = "8k"
    runtime_s: float = 5.0
    walks: tuple[str, ...] = WALKS


@dataclass(frozen=True)
class Definition:
    """One study, as parsed from its TOML file (and `quick` overrides applied or not)."""

    name: str
    path: str
    kind: str = "startup"
    figure: str = ""
    description: str = ""
    workloads: tuple[str, ...] = ("standin-python",)
    systems: tuple[str, ...] = ("tgz-overlayfs", "lazy")
    networks: tuple[str, ...] = ("none",)
    disks: tuple[str, ...] = ("local",)
    cache: tuple[str, ...] = ("cold",)
    repetitions: int = 3
    order: str = "interleaved"
    seed: int = 0
    timeout_s: float = 120.0
    trace: bool = False
    device: DeviceSettings = field(default_factory=DeviceSettings)
    quick: bool = False

    def parameters(self) -> dict[str, Any]:
        """The definition as plain data, for the environment record of a run."""
        return dataclasses.asdict(self)


_LISTS: Final = ("workloads", "systems", "networks", "disks", "cache")
_KEYS: Final = {
    "name": str,
    "kind": str,
    "figure": str,
    "description": str,
    "repetitions": int,
    "order": str,
    "seed": int,
    "timeout_s": (int, float),
    "trace": bool,
    **dict.fromkeys(_LISTS, list),
}
_DEVICE_KEYS: Final = {
    "queue_depths": list,
    "block_size": str,
    "runtime_s": (int, float),
    "walks": list,
}


def load_definition(path: str | os.PathLike[str], *, quick: bool = False) -> Definition:
    """Parse and check the definition at `path`; with `quick`, its ``[quick]`` table applies."""
    source = Path(path)
    try:
        document = tomllib.loads(source.read_text())
    except FileNotFoundError:
        raise DefinitionError(
            f"{source}: no such experiment definition; the studies are in experiments/*.toml"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise DefinitionError(f"{source}: not valid TOML: {exc}") from exc
    return parse_definition(document, str(source), quick=quick)


def parse_definition(document: dict[str, Any], where: str, *, quick: bool = False) -> Definition:
    """A `Definition` of an already parsed TOML document (`where` names it in errors)."""
    document = dict(document)
    overrides = document.pop("quick", {})
    device = document.pop("device", {})
    _check_table(overrides, "quick", where)
    _check_table(device, "device", where)
    _check_keys(document, _KEYS, where, "")
    _check_keys(overrides, _KEYS, where, "quick.")
    _check_keys(device, _DEVICE_KEYS, where, "device.")
    if quick:
        document.update(overrides)

    if "name" not in document:
        raise DefinitionError(f'{where}: the definition has no name; add name = "..."')
    values: dict[str, Any] = {key: value for key, value in document.items() if key not in _LISTS}
    for key in _LISTS:
        if key in document:
            values[key] = _string_list(document[key], key, where)
    definition = Definition(path=where, device=_device(device, where), quick=quick, **values)
    _check_values(definition, where)
    return definition


def _check_table(value: Any, key: str, where: str) -> None:
    if not isinstance(value, dict):
        raise DefinitionError(f"{where}: [{key}] must be a table, got {value!r}")


def _check_keys(table: dict[str, Any], allowed: dict[str, Any], where: str, prefix: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise DefinitionError(f"{where}: unknown key {prefix}{key}; known keys: {known}")
        wanted = allowed[key]
        bad_bool = isinstance(value, bool) and wanted is not bool
        if bad_bool or not isinstance(value, wanted):
            kind = " or ".join(
                t.__name__ for t in (wanted if isinstance(wanted, tuple) else (wanted,))
            )
            raise DefinitionError(f"{where}: {prefix}{key} must be {kind}, got {value!r}")


def _string_list(value: list[Any], key: str, where: str) -> tuple[str, ...]:
    if not value or not all(isinstance(item, str) for item in value):
        raise DefinitionError(f"{where}: {key} must be a non-empty list of names, got {value!r}")
    if len(set(value)) != len(value):
        raise DefinitionError(f"{where}: {key} names an entry twice: {value!r}")
    return tuple(value)


def _device(table: dict[str, Any], where: str) -> DeviceSettings:
    values = dict(table)
    if "queue_depths" in values:
        depths = values["queue_depths"]
        if not depths or not all(isinstance(d, int) and 1 <= d <= 1024 for d in depths):
            raise DefinitionError(
                f"{where}: device.queue_depths must be integers from 1 to 1024, got {depths!r}"
            )
        values["queue_depths"] = tuple(depths)
    if "walks" in values:
        walks = _string_list(values["walks"], "device.walks", where)
        unknown = [walk for walk in walks if walk not in WALKS]
        if unknown:
            raise DefinitionError(
                f"{where}: unknown device.walks {unknown}; choose from {', '.join(WALKS)}"
            )
        values["walks"] = walks
    if values.get("runtime_s", 1) <= 0:
        raise DefinitionError(f"{where}: device.runtime_s must be > 0, got {values['runtime_s']}")
    return DeviceSettings(**values)


def _check_values(definition: Definition, where: str) -> None:
    def choose(key: str, value: str, allowed: Any) -> None:
        if value not in allowed:
            raise DefinitionError(
                f"{where}: unknown {key} {value!r}; choose one of {', '.join(allowed)}"
            )

    choose("kind", definition.kind, KINDS)
    choose("order", definition.order, ORDERS)
    systems = DEVICE_SYSTEMS if definition.kind == "device" else STARTUP_SYSTEMS
    if definition.kind != "sizes":
        for system in definition.systems:
            choose(f"system (for kind {definition.kind})", system, systems)
    for network in definition.networks:
        choose("network preset", network, ("none", *PRESETS))
    for disk in definition.disks:
        choose("disk preset", disk, tuple(DISK_PRESETS))
    for state in definition.cache:
        choose("cache state", state, CACHE_STATES)
    if definition.repetitions < 1:
        raise DefinitionError(
            f"{where}: repetitions must be at least 1, got {definition.repetitions}"
        )
    if definition.timeout_s <= 0:
        raise DefinitionError(f"{where}: timeout_s must be > 0, got {definition.timeout_s}")
