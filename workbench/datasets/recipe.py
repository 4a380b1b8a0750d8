"""Dataset recipes: the TOML files under ``datasets/`` that describe an evaluation image.

A recipe names its layers, bottom first, and the workload the image carries:

    description = "Redis from Debian, ready on its log line"
    base = "debian"                        # the layers of datasets/debian.toml come first

    [[layers]]
    comment = "redis-server from Debian"   # the layer's history entry
    apt = ["redis-server"]

    [workload]
    command = ["redis-server", "--protected-mode", "no"]
    ports = [6379]
    ready = { log = "Ready to accept connections" }
    ready_means = "redis has loaded its (empty) data set and accepts clients"

A layer does, in this order, whichever of these it names:
- ``files``: a list of ``{ path = "/abs", text = "..." | source = "file" | symlink = "target"
  | dir = true, mode = "0644", uid = 0, gid = 0 }``; ``source`` is relative to the recipe's
  directory (or absolute, a host file such as /bin/busybox);
- ``debootstrap = { suite = "bookworm", variant = "minbase", include = [], mirror = "" }``
  (only in a first layer; the mirror defaults to the one apt uses on this host);
- ``apt = ["package", ...]``: apt-get install --no-install-recommends, in a chroot;
- ``pip = { packages = ["numpy==2.2.6"], python = "3.11", target = "...", platforms = [...] }``:
  wheels fetched by the host's pip for the image's Python, byte-compiled in the chroot;
- ``run = "shell script"``: run by the image's /bin/sh in a chroot (set -e).

The workload: ``command`` (argv), ``env`` (added to PATH and LANG), ``workdir``, ``ports``,
``ready`` (one probe table, see `probes.from_spec`), ``ready_means`` (a sentence) and
``timeout`` (seconds, default 120). More workloads of the same image go in
``[workloads.VARIANT]`` tables, addressed as ``workload(name, VARIANT)``.

Caveats:
- keys are checked strictly: an unknown key is an error naming it and the known ones;
- a base recipe's workload is not inherited (every recipe says what its image runs);
- the recipe hash covers the recipe text, its bases and the content of ``source`` files, not
  the mirror's or PyPI's state: pin versions (``pkg==1.2``) where reproducibility matters.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.datasets.probes import Probe, from_spec
from workbench.errors import RecipeError

__all__ = [
    "DEFAULT_ENV",
    "DEFAULT_EPOCH",
    "FileSpec",
    "LayerSpec",
    "Recipe",
    "Workload",
    "load_recipe",
    "recipe_hash",
    "recipes_dir",
]

DEFAULT_EPOCH = 1767225600
"""SOURCE_DATE_EPOCH of every layer (2026-01-01T00:00:00Z): later mtimes are clamped to it."""

DEFAULT_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
"""The environment every workload starts with; its ``env`` adds to it."""

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.:~-]*(=[A-Za-z0-9+.:~-]+)?$")

_TOP_KEYS = {"description", "base", "source_date_epoch", "layers", "workload", "workloads"}
_LAYER_KEYS = {"comment", "files", "debootstrap", "apt", "pip", "run"}
_FILE_KEYS = {"path", "text", "source", "symlink", "dir", "mode", "uid", "gid"}
_DEBOOTSTRAP_KEYS = {"suite", "variant", "include", "mirror"}
_PIP_KEYS = {"packages", "python", "target", "platforms"}
_WORKLOAD_KEYS = {"command", "env", "workdir", "ports", "ready", "ready_means", "timeout"}

DEFAULT_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
"""Wheel platforms pip may pick for a Debian 12 (glibc 2.36) x86_64 image."""


@dataclass(frozen=True)
class FileSpec:
    """One entry of a layer's ``files``: exactly one of text, source, symlink, dir."""

    path: str
    text: str | None = None
    source: Path | None = None
    symlink: str | None = None
    dir: bool = False
    mode: int | None = None
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a recipe (see the module docstring for the order of its steps)."""

    comment: str
    files: tuple[FileSpec, ...] = ()
    debootstrap: Mapping[str, Any] | None = None
    apt: tuple[str, ...] = ()
    pip: Mapping[str, Any] | None = None
    run: str | None = None
    recipe: str = ""
    epoch: int = DEFAULT_EPOCH

    def identity(self) -> dict[str, Any]:
        """What the layer's cache key covers: every field, and the bytes of source files."""
        files = []
        for spec in self.files:
            entry = {
                "path": spec.path,
                "text": spec.text,
                "symlink": spec.symlink,
                "dir": spec.dir,
                "mode": spec.mode,
                "uid": spec.uid,
                "gid": spec.gid,
            }
            if spec.source is not None:
                entry["source"] = hashlib.sha256(spec.source.read_bytes()).hexdigest()
            files.append(entry)
        return {
            "files": files,
            "debootstrap": dict(self.debootstrap) if self.debootstrap else None,
            "apt": list(self.apt),
            "pip": dict(self.pip) if self.pip else None,
            "run": self.run,
            "epoch": self.epoch,
        }


@dataclass(frozen=True)
class Workload:
    """What an image runs and when that counts as ready.

    `image` is the recipe name (`workbench.datasets.build(image)` gives its OCI layout, tag
    = name); `command` is the argv, `env` the full environment, `ports` the TCP ports it
    listens on, `probe` its ready probe and `ready_means` a sentence saying what ready is.
    """

    name: str
    image: str
    command: tuple[str, ...]
    env: Mapping[str, str]
    workdir: str
    ports: tuple[int, ...]
    probe: Probe
    ready_means: str
    timeout: float = 120.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "command": list(self.command),
            "env": dict(self.env),
            "workdir": self.workdir,
            "ports": list(self.ports),
            "ready": self.probe.to_spec(),
            "ready_means": self.ready_means,
            "timeout": self.timeout,
        }


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: its own layers (`layers`) and, with its bases', `all_layers`."""

    name: str
    path: Path
    description: str
    base: str | None
    epoch: int
    layers: tuple[LayerSpec, ...]
    all_layers: tuple[LayerSpec, ...]
    workloads: Mapping[str, Workload] = field(default_factory=dict)
    text: str = ""

    @property
    def workload(self) -> Workload:
        return self.workloads[""]


def recipes_dir() -> Path:
    """The top-level ``datasets/`` directory of the workbench's source tree."""
    return Path(__file__).resolve().parents[2] / "datasets"


def load_recipe(name: str, directory: Path | None = None, _seen: tuple[str, ...] = ()) -> Recipe:
    """Parse ``<directory>/<name>.toml`` and its bases; raises `RecipeError` on any fault."""
    directory = directory or recipes_dir()
    if not NAME_RE.match(name):
        raise RecipeError(
            f"recipe name {name!r}: use lowercase letters, digits, '.', '_' and '-' "
            "(it becomes the image tag)"
        )
    path = directory / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.toml"))) or "none"
        raise RecipeError(f"no recipe {name!r}: {path} does not exist; known recipes: {known}")
    if name in _seen:
        chain = " -> ".join((*_seen, name))
        raise RecipeError(f"recipe {path}: base chain loops ({chain}); remove one base")

    text = path.read_text()
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {path} is not valid TOML: {exc}") from None
    where = f"recipe {path}"
    _check_keys(table, _TOP_KEYS, where)

    base_name = _optional(table, "base", str, where)
    base = load_recipe(base_name, directory, (*_seen, name)) if base_name else None
    epoch = _optional(table, "source_date_epoch", int, where) or DEFAULT_EPOCH

    layers = _layers(table.get("layers"), path, name, where, base is None, epoch)
    if not layers and base is None:
        raise RecipeError(f"{where}: no [[layers]] and no base; there is no image to build")
    all_layers = (*(base.all_layers if base else ()), *layers)
    workloads = _workloads(table, name, where)
    return Recipe(
        name=name,
        path=path,
        description=_optional(table, "description", str, where) or "",
        base=base_name,
        epoch=epoch,
        layers=layers,
        all_layers=all_layers,
        workloads=workloads,
        text=text,
    )


def recipe_hash(recipe: Recipe) -> str:
    """sha256 over the recipe's layers (with their bases) and its workloads."""
    document = {
        "epoch": recipe.epoch,
        "layers": [layer.identity() for layer in recipe.all_layers],
        "workloads": {key: wl.to_json() for key, wl in sorted(recipe.workloads.items())},
    }
    return hashlib.sha256(_canonical(document)).hexdigest()


def _canonical(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


# Layers


def _layers(
    value: Any, path: Path, name: str, where: str, first: bool, epoch: int
) -> tuple[LayerSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RecipeError(f"{where}: layers must be an array of tables ([[layers]])")
    layers = []
    for index, table in enumerate(value):
        at = f"{where}: layers[{index}]"
        if not isinstance(table, dict):
            raise RecipeError(f"{at}: expected a table, got {table!r}")
        layers.append(_layer(table, path, name, at, first and index == 0, epoch))
    return tuple(layers)


def _layer(
    table: dict[str, Any], path: Path, name: str, at: str, first: bool, epoch: int
) -> LayerSpec:
    _check_keys(table, _LAYER_KEYS, at)
    actions = [key for key in ("debootstrap", "apt", "pip") if key in table]
    if len(actions) > 1:
        raise RecipeError(
            f"{at}: one of debootstrap, apt, pip per layer (got {actions}); split it in two"
        )
    if not actions and "files" not in table and "run" not in table:
        raise RecipeError(f"{at}: an empty layer; give files, debootstrap, apt, pip or run")

    debootstrap = _debootstrap(table["debootstrap"], at) if "debootstrap" in table else None
    if debootstrap is not None and not first:
        raise RecipeError(f"{at}: debootstrap makes a root file system; only a first layer can")
    if debootstrap is not None and "files" in table:
        raise RecipeError(f"{at}: a debootstrap layer takes no files; put them in the next layer")
    if first and ("apt" in table or "pip" in table):
        raise RecipeError(f"{at}: apt and pip need a root file system below them; add a base")

    run = _optional(table, "run", str, at)
    return LayerSpec(
        comment=_optional(table, "comment", str, at) or ", ".join(actions or ["files"]),
        files=tuple(
            _file(entry, path, f"{at}.files[{i}]")
            for i, entry in enumerate(_list(table.get("files", []), dict, f"{at}.files"))
        ),
        debootstrap=debootstrap,
        apt=_apt(table.get("apt"), at),
        pip=_pip(table["pip"], at) if "pip" in table else None,
        run=run,
        recipe=name,
        epoch=epoch,
    )


def _file(entry: dict[str, Any], recipe_path: Path, at: str) -> FileSpec:
    _check_keys(entry, _FILE_KEYS, at)
    target = entry.get("path")
    if not isinstance(target, str) or not target.startswith("/") or ".." in target.split("/"):
        raise RecipeError(f"{at}: path must be absolute and without '..', got {target!r}")
    kinds = [key for key in ("text", "source", "symlink", "dir") if key in entry]
    if len(kinds) != 1:
        raise RecipeError(f"{at} ({target}): give exactly one of text, source, symlink, dir")

    source = None
    if "source" in entry:
        source = (recipe_path.parent / _optional(entry, "source", str, at)).resolve()
        if not source.is_file():
            raise RecipeError(f"{at} ({target}): source {source} is not a file")
    mode = entry.get("mode")
    if mode is not None:
        if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3,4}", mode):
            raise RecipeError(f'{at} ({target}): mode must be an octal string such as "0644"')
        mode = int(mode, 8)
    return FileSpec(
        path=target,
        text=_optional(entry, "text", str, at),
        source=source,
        symlink=_optional(entry, "symlink", str, at),
        dir=bool(_optional(entry, "dir", bool, at)),
        mode=mode,
        uid=_optional(entry, "uid", int, at) or 0,
        gid=_optional(entry, "gid", int, at) or 0,
    )


def _debootstrap(value: Any, at: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecipeError(f'{at}: debootstrap must be a table such as {{ suite = "bookworm" }}')
    _check_keys(value, _DEBOOTSTRAP_KEYS, f"{at}.debootstrap")
    include = _list(value.get("include", []), str, f"{at}.debootstrap.include")
    for package in include:
        _check_package(package, f"{at}.debootstrap.include")
    return {
        "suite": _optional(value, "suite", str, at) or "bookworm",
        "variant": _optional(value, "variant", str, at) or "minbase",
        "include": include,
        "mirror": _optional(value, "mirror", str, at) or "",
    }


def _apt(value: Any, at: str) -> tuple[str, ...]:
    if value is None:
        return ()
    packages = _list(value, str, f"{at}.apt")
    if not packages:
        raise RecipeError(f"{at}.apt: an empty package list; name at least one package")
    for package in packages:
        _check_package(package, f"{at}.apt")
    return tuple(packages)


def _pip(value: Any, at: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecipeError(f'{at}: pip must be a table such as {{ packages = ["numpy==2.2.6"] }}')
    _check_keys(value, _PIP_KEYS, f"{at}.pip")
    packages = _list(value.get("packages"), str, f"{at}.pip.packages")
    if not packages:
        raise RecipeError(f"{at}.pip.packages: name at least one requirement")
    python = _optional(value, "python", str, at) or "3.11"
    if not re.fullmatch(r"3\.\d+", python):
        raise RecipeError(f'{at}.pip.python: expected a version such as "3.11", got {python!r}')
    target = _optional(value, "target", str, at) or f"/usr/local/lib/python{python}/dist-packages"
    if not target.startswith("/"):
        raise RecipeError(f"{at}.pip.target: must be an absolute path, got {target!r}")
    platforms = _list(value.get("platforms", list(DEFAULT_PLATFORMS)), str, f"{at}.pip")
    return {"packages": packages, "python": python, "target": target, "platforms": platforms}


# Workloads


def _workloads(table: dict[str, Any], name: str, where: str) -> dict[str, Workload]:
    if "workload" not in table:
        raise RecipeError(f"{where}: no [workload]; say what the image runs and when it is ready")
    workloads = {"": _workload(table["workload"], name, "", f"{where}: workload")}
    extra = table.get("workloads", {})
    if not isinstance(extra, dict):
        raise RecipeError(f"{where}: workloads must be tables [workloads.VARIANT]")
    for variant, spec in extra.items():
        if not NAME_RE.match(variant):
            raise RecipeError(f"{where}: workload variant {variant!r}: use a short lowercase name")
        workloads[variant] = _workload(spec, name, variant, f"{where}: workloads.{variant}")
    return workloads


def _workload(spec: Any, name: str, variant: str, at: str) -> Workload:
    if not isinstance(spec, dict):
        raise RecipeError(f"{at}: expected a table")
    _check_keys(spec, _WORKLOAD_KEYS, at)
    command = _list(spec.get("command"), str, f"{at}.command")
    if not command:
        raise RecipeError(f'{at}.command: give the argv, e.g. ["redis-server"]')
    env_table = spec.get("env", {})
    if not isinstance(env_table, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env_table.items()
    ):
        raise RecipeError(f'{at}.env: expected a table of strings, e.g. {{ PGDATA = "/x" }}')
    ports = _list(spec.get("ports", []), int, f"{at}.ports")
    if any(not 0 < port < 65536 for port in ports):
        raise RecipeError(f"{at}.ports: ports are 1..65535, got {ports}")
    if "ready" not in spec:
        raise RecipeError(f'{at}: no ready probe; e.g. ready = {{ http = "/", port = 80 }}')
    ready_means = _optional(spec, "ready_means", str, at)
    if not ready_means:
        raise RecipeError(f"{at}: ready_means missing; say in a sentence what ready means")
    timeout = spec.get("timeout", 120.0)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise RecipeError(f"{at}.timeout: a positive number of seconds, got {timeout!r}")
    return Workload(
        name=f"{name}/{variant}" if variant else name,
        image=name,
        command=tuple(command),
        env={**DEFAULT_ENV, **env_table},
        workdir=_optional(spec, "workdir", str, at) or "/",
        ports=tuple(ports),
        probe=from_spec(spec["ready"], f"{at}.ready"),
        ready_means=ready_means,
        timeout=float(timeout),
    )


# Checks


def _check_keys(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")


def _optional(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecipeError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def _list(value: Any, kind: type, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, kind) for item in value):
        raise RecipeError(f"{where}: expected a list of {kind.__name__}, got {value!r}")
    return value


def _check_package(package: str, where: str) -> None:
    if not PACKAGE_RE.match(package):
        raise RecipeError(f"{where}: {package!r} is not a Debian package name (name or name=ver)")
