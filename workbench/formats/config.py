"""config.v1.json: the per-device image config that names an image's layers.

The snapshotter writes one of these per device (`<snapshot>/block/config.v1.json`) and the
block handler opens the image it describes (shared/specs/overlaybd-formats.md, section 4.1).
A config written here is read by OverlayBD and by the Go snapshotter, and the other way round.

Layout (JSON object; keys are camelCase)
    repoBlobUrl        str    registry URL of the repository's blobs, e.g.
                              ``https://registry-1.docker.io/v2/library/redis/blobs``
    lowers             list   read-only layers, ``lowers[0]`` the bottom (base) one:
        digest         str    ``sha256:...`` of the layer blob in the registry
        size           int    bytes of the blob
        dir            str    the layer's snapshot directory; holds ``overlaybd.commit`` etc.
        file           str    an explicit local layer file, tried first
        targetFile     str    TurboOCI: the original OCI layer tar, local
        targetDigest   str    TurboOCI: the original OCI layer blob, remote
        gzipIndex      str    TurboOCI: the gzip index of the target
    upper              obj    the writable layer; ``{}`` when the device is read-only:
        index, data    str    the writable layer's index and data files
        target         str    TurboOCI target of a writable warp layer
        gzipIndex      str    TurboOCI gzip index
        vsize          int    virtual size in GiB
    resultFile         str    where the opener writes ``success`` or ``failed:<reason>``
    accelerationLayer  bool   the last lower holds a prefetch trace, not disk data
    recordTracePath    str    record a prefetch trace to this file
    download           obj    background download of remote lowers: enable (bool),
                              delay, delayExtra, maxMBps, tryCnt, blockSize (int)

Compatibility
    Output follows the Go snapshotter's encoding: ``repoBlobUrl``, ``lowers``, ``upper``
    (``{}`` if empty) and ``resultFile`` always appear; every other field only when set.
    Keys this module does not know are kept and written back after the known ones.

Paths
    A relative path in a config (``dir``, ``file``, ``index``, ...) resolves against the
    directory holding the config file; `ImageConfig.resolve_path` does that. A config made
    by `loads` without a `base_dir` resolves against the current directory.

Caveats:
- `resolve_lower` only says where a lower is (a local `Path` or a `RemoteBlob`); opening a
  remote one is the registry session's job (`workbench.image.open`);
- TurboOCI fields are parsed and kept, but nothing opens warp layers yet.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from workbench.errors import ImageConfigError

__all__ = [
    "LOWER_FILE_NAMES",
    "MAX_CONFIG_LOWERS",
    "DownloadConfig",
    "ImageConfig",
    "LowerConfig",
    "RemoteBlob",
    "UpperConfig",
    "load",
    "loads",
]

log = logging.getLogger(__name__)

MAX_CONFIG_LOWERS: Final = 256
"""Most lowers a config may name (the LSMT stack itself stops at 255)."""

LOWER_FILE_NAMES: Final = ("overlaybd.commit", ".commit", "overlaybd.sealed")
"""Files looked for, in this order, in a lower's `dir` when it has no `file`."""


# ---------------------------------------------------------------------------------------------
# Field checking


def _take(
    obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any
) -> Any:
    """Pop `key` from `obj`, checking its JSON type; `default` if absent or null."""
    value = obj.pop(key, None)
    if value is None:
        return default

    # bool is an int in Python but not in JSON; keep the two apart.
    wrong_bool = isinstance(value, bool) and bool not in _as_tuple(kind)
    if wrong_bool or not isinstance(value, kind):
        raise ImageConfigError(
            f"{where}.{key} must be {_json_type(kind)}, got {_json_type(type(value))} "
            f"{value!r}; fix the config"
        )
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _json_type(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object"}
    names |= {list: "a list", float: "a number", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _non_negative(value: int, where: str) -> int:
    if value < 0:
        raise ImageConfigError(f"{where} must be >= 0, got {value}; fix the config")
    return value


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` unless `value` is empty, as Go's `omitempty` does."""
    if value not in ("", 0, False, None):
        out[key] = value


# ---------------------------------------------------------------------------------------------
# Records


@dataclass
class LowerConfig:
    """One read-only layer of a config; see the module docstring for each field."""

    digest: str = ""
    size: int = 0
    dir: str = ""
    file: str = ""
    target_file: str = ""
    target_digest: str = ""
    gzip_index: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this module does not know, kept for the round trip."""

    @classmethod
    def from_json(cls, obj: Any, where: str) -> LowerConfig:
        if not isinstance(obj, dict):
            raise ImageConfigError(f"{where} must be an object, got {obj!r}; fix the config")
        rest = dict(obj)
        lower = cls(
            gzip_index=_take(rest, "gzipIndex", str, where, ""),
            file=_take(rest, "file", str, where, ""),
            digest=_take(rest, "digest", str, where, ""),
            target_file=_take(rest, "targetFile", str, where, ""),
            target_digest=_take(rest, "targetDigest", str, where, ""),
            size=_non_negative(_take(rest, "size", int, where, 0), f"{where}.size"),
            dir=_take(rest, "dir", str, where, ""),
            extra=rest,
        )
        if not (lower.file or lower.dir or lower.digest):
            raise ImageConfigError(
                f"{where} names no layer: it needs a 'file', a 'dir' or a 'digest'"
            )
        return lower

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        _put(out, "gzipIndex", self.gzip_index)
        _put(out, "file", self.file)
        _put(out, "digest", self.digest)
        _put(out, "targetFile", self.target_file)
        _put(out, "targetDigest", self.target_digest)
        _put(out, "size", self.size)
        _put(out, "dir", self.dir)
        return out | self.extra


@dataclass
class UpperConfig:
    """The writable layer of a config; all fields empty for a read-only device."""

    index: str = ""
    data: str = ""
    target: str = ""
    gzip_index: str = ""
    vsize: int = 0
    """Virtual size in GiB, as the snapshotter writes it."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """True if the config has no writable layer (a read-only device)."""
        return not self.data

    @classmethod
    def from_json(cls, obj: Any, where: str = "upper") -> UpperConfig:
        if not isinstance(obj, dict):
            raise ImageConfigError(f"{where} must be an object, got {obj!r}; fix the config")
        rest = dict(obj)
        upper = cls(
            index=_take(rest, "index", str, where, ""),
            data=_take(rest, "data", str, where, ""),
            target=_take(rest, "target", str, where, ""),
            gzip_index=_take(rest, "gzipIndex", str, where, ""),
            vsize=_non_negative(_take(rest, "vsize", int, where, 0), f"{where}.vsize"),
            extra=rest,
        )
        if upper.index and not upper.data:
            raise ImageConfigError(
                f"{where} has an 'index' but no 'data'; a writable layer needs its data file"
            )
        return upper

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        _put(out, "index", self.index)
        _put(out, "data", self.data)
        _put(out, "target", self.target)
        _put(out, "gzipIndex", self.gzip_index)
        _put(out, "vsize", self.vsize)
        return out | self.extra


_DOWNLOAD_KEYS: Final = (
    ("enable", "enable", bool),
    ("delay", "delay", int),
    ("delay_extra", "delayExtra", int),
    ("max_mbps", "maxMBps", int),
    ("try_cnt", "tryCnt", int),
    ("block_size", "blockSize", int),
)
"""(attribute, JSON key, type) of each field of `DownloadConfig`, in OverlayBD's order."""


@dataclass
class DownloadConfig:
    """Background download of remote lowers; defaults are OverlayBD's."""

    enable: bool = False
    delay: int = 300
    delay_extra: int = 30
    max_mbps: int = 100
    try_cnt: int = 5
    block_size: int = 262144
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any, where: str = "download") -> DownloadConfig:
        if not isinstance(obj, dict):
            raise ImageConfigError(f"{where} must be an object, got {obj!r}; fix the config")
        rest = dict(obj)
        defaults = cls()
        values = {}
        for attr, key, kind in _DOWNLOAD_KEYS:
            value = _take(rest, key, kind, where, getattr(defaults, attr))
            if kind is int:
                _non_negative(value, f"{where}.{key}")
            values[attr] = value
        return cls(**values, extra=rest)

    def to_json(self) -> dict[str, Any]:
        out = {key: getattr(self, attr) for attr, key, _ in _DOWNLOAD_KEYS}
        return out | self.extra


@dataclass(frozen=True)
class RemoteBlob:
    """A lower that lives in a registry: ``repoBlobUrl`` (``http(s)://host/v2/repo/blobs``),
    the blob digest and its size (0 when the config does not say)."""

    repo_blob_url: str
    digest: str
    size: int = 0

    @property
    def url(self) -> str:
        return self.repo_blob_url.rstrip("/") + "/" + self.digest


@dataclass
class ImageConfig:
    """A parsed config.v1.json; see the module docstring for the fields and the rules."""

    lowers: list[LowerConfig] = field(default_factory=list)
    upper: UpperConfig = field(default_factory=UpperConfig)
    repo_blob_url: str = ""
    result_file: str = ""
    acceleration_layer: bool = False
    record_trace_path: str = ""
    download: DownloadConfig | None = None
    """None when the config has no ``download`` object (it is then not written either)."""
    extra: dict[str, Any] = field(default_factory=dict)
    base_dir: Path | None = None
    """Directory relative paths resolve against: the config file's; not serialized."""

    # Parsing and writing -------------------------------------------------------------

    @classmethod
    def from_json(cls, obj: Any, base_dir: Path | None = None) -> ImageConfig:
        """Build from a decoded JSON object; raises `ImageConfigError` on a broken rule."""
        if not isinstance(obj, dict):
            raise ImageConfigError(
                f"an image config must be a JSON object, got {type(obj).__name__}"
            )
        rest = dict(obj)
        lowers_json = _take(rest, "lowers", list, "config", [])
        if len(lowers_json) > MAX_CONFIG_LOWERS:
            raise ImageConfigError(
                f"config.lowers has {len(lowers_json)} layers; at most {MAX_CONFIG_LOWERS} "
                "are allowed, flatten some layers (merge) first"
            )
        download_json = _take(rest, "download", dict, "config", None)
        return cls(
            repo_blob_url=_take(rest, "repoBlobUrl", str, "config", ""),
            lowers=[
                LowerConfig.from_json(lower, f"lowers[{i}]") for i, lower in enumerate(lowers_json)
            ],
            upper=UpperConfig.from_json(_take(rest, "upper", dict, "config", {})),
            result_file=_take(rest, "resultFile", str, "config", ""),
            acceleration_layer=_take(rest, "accelerationLayer", bool, "config", False),
            record_trace_path=_take(rest, "recordTracePath", str, "config", ""),
            download=None if download_json is None else DownloadConfig.from_json(download_json),
            extra=rest,
            base_dir=base_dir,
        )

    def to_json(self) -> dict[str, Any]:
        """The config as a JSON object, encoded as the Go snapshotter does."""
        out: dict[str, Any] = {
            "repoBlobUrl": self.repo_blob_url,
            "lowers": [lower.to_json() for lower in self.lowers],
            "upper": self.upper.to_json(),
            "resultFile": self.result_file,
        }
        _put(out, "accelerationLayer", self.acceleration_layer)
        _put(out, "recordTracePath", self.record_trace_path)
        if self.download is not None:
            out["download"] = self.download.to_json()
        return out | self.extra

    @classmethod
    def loads(cls, text: str | bytes, base_dir: Path | None = None) -> ImageConfig:
        """Parse config text; relative paths will resolve against `base_dir` (or the cwd)."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ImageConfigError(
                f"image config is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        return cls.from_json(obj, base_dir)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ImageConfig:
        """Read a config file; relative paths in it resolve against its directory."""
        path = Path(path)
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise ImageConfigError(f"{path}: image config not found") from None
        try:
            return cls.loads(text, base_dir=path.resolve().parent)
        except ImageConfigError as exc:
            raise ImageConfigError(f"{path}: {exc}") from None

    def dumps(self) -> str:
        """The config as JSON text (indented, one trailing newline)."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write the config to `path` atomically (a temporary file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.dumps())
        os.replace(tmp, path)

    # Paths ---------------------------------------------------------------------------

    def resolve_path(self, value: str) -> Path:
        """A path of the config as a usable path: relative ones join `base_dir`."""
        path = Path(value)
        if path.is_absolute() or self.base_dir is None:
            return path
        return self.base_dir / path

    def blob_url(self, lower: LowerConfig) -> str:
        """The registry URL of a lower's blob: ``repoBlobUrl/digest``."""
        if not (self.repo_blob_url and lower.digest):
            raise ImageConfigError(
                "a remote lower needs both config.repoBlobUrl and the lower's digest"
            )
        return self.repo_blob_url.rstrip("/") + "/" + lower.digest

    def resolve_lower(self, lower: LowerConfig | int) -> Path | Any:
        """Where to read a lower from: its local file, else its registry blob.

        Tried in order: `file` if it exists, then `dir/overlaybd.commit`, `dir/.commit`,
        `dir/overlaybd.sealed`. A lower found nowhere locally but with a `digest` (and a
        `repoBlobUrl` in the config) is remote: it goes to `resolve_remote_lower`, which
        raises `UnsupportedFormatError` until the registry reader exists.

        Returns
        -------
        Path
            The local layer file (tar, ZFile or LSMT; the opener detects which).

        Raises
        ------
        ImageConfigError
            If the layer is neither local nor remote; the message lists what was tried.
        """
        if isinstance(lower, int):
            lower = self.lowers[lower]

        tried = self._local_candidates(lower)
        for candidate in tried:
            if candidate.is_file():
                return candidate

        if lower.digest and self.repo_blob_url:
            return RemoteBlob(self.repo_blob_url, lower.digest, lower.size)

        looked = ", ".join(str(path) for path in tried) or "no local path"
        raise ImageConfigError(
            f"lower {lower.digest or lower.dir or lower.file!r} not found: tried {looked}; "
            "and it cannot be fetched without a digest and config.repoBlobUrl"
        )

    def _local_candidates(self, lower: LowerConfig) -> list[Path]:
        candidates = []
        if lower.file:
            candidates.append(self.resolve_path(lower.file))
        if lower.dir:
            directory = self.resolve_path(lower.dir)
            candidates.extend(directory / name for name in LOWER_FILE_NAMES)
        return candidates


def load(path: str | os.PathLike[str]) -> ImageConfig:
    """Read a config.v1.json; see `ImageConfig.load`."""
    return ImageConfig.load(path)


def loads(text: str | bytes, base_dir: Path | None = None) -> ImageConfig:
    """Parse config text; see `ImageConfig.loads`."""
    return ImageConfig.loads(text, base_dir)
