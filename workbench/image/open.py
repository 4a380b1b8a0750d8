"""Opening the image a config.v1.json describes, as OverlayBD's block handler does.

`open_image` reads the config (`workbench.formats.config`), opens every lower as a read-only
layer (tar and ZFile wrapping are detected by `ReadOnlyLayer.open`), the writable layer if the
config has one, and stacks them into a `LayerStack`. The upper comes in one of three modes
(`UpperMode`): left out (``"none"``, the lowers alone), opened read-only (``"readonly"``: its
writes are visible, its files are never modified, even a torn tail is left as it is; what
readers such as `workbench export` use) or opened for writing (``"writable"``, the default).
`write_result` reports the outcome to the config's ``resultFile`` the way OverlayBD does, so
tools that wait on that file (the snapshotter) see ``success`` or ``failed:<reason>``.

Lower resolution follows `ImageConfig.resolve_lower`: a local file first, then the files in
the lower's ``dir``; a remote lower (``repoBlobUrl`` + digest) is read lazily from its registry
through a `RegistrySession` (block cache included): the one given, else the process-wide
default session.

Caveats:
- with ``accelerationLayer`` set, the last lower holds a prefetch trace, not disk data; it is
  left out of the stack as OverlayBD does, and the trace is not replayed;
- TurboOCI (warp) lowers and uppers are not supported yet.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from workbench.blobs.common import RandomAccessFile
from workbench.errors import ImageConfigError, UnsupportedFormatError
from workbench.formats.config import ImageConfig, LowerConfig, RemoteBlob
from workbench.image.stack import Layer, LayerStack, WritableUpper

if TYPE_CHECKING:
    from workbench.registry.session import RegistrySession

__all__ = ["UpperMode", "open_image", "open_lowers", "open_upper", "write_result"]

log = logging.getLogger(__name__)

UpperMode = Literal["none", "readonly", "writable"]
"""How `open_image` treats the config's writable layer: leave it out, read it, or write it."""

UPPER_MODES: tuple[UpperMode, ...] = ("none", "readonly", "writable")


def open_image(
    config: str | os.PathLike[str] | ImageConfig,
    writable: bool = True,
    *,
    upper: UpperMode | None = None,
    check_uuid_chain: bool = False,
    report_result: bool = False,
    session: RegistrySession | None = None,
) -> LayerStack:
    """Open the image of a config as one disk.

    Parameters
    ----------
    config
        A config.v1.json path, or an already parsed `ImageConfig`.
    writable
        Shorthand kept for existing callers: True is ``upper="writable"``, False is
        ``upper="none"``.
    upper
        What to do with the config's writable layer, if it has one: ``"none"`` leaves it out
        (the lowers only), ``"readonly"`` stacks it opened read-only (its writes show, its
        files stay untouched, writes to the stack raise `ReadOnlyError`), ``"writable"``
        stacks it for writing. Overrides `writable`; ``writable=False`` with an `upper`
        other than ``"none"`` is a contradiction and raises `ValueError`.
    check_uuid_chain
        Check each layer's parent_uuid against the layer below (off in OverlayBD).
    report_result
        Write ``success`` or ``failed:<reason>`` to the config's resultFile, as OverlayBD
        does when it opens a device.

    Raises
    ------
    ImageConfigError
        For a malformed config or a lower that cannot be found.
    FormatError
        For a layer file that is not a valid layer (the message names the file).
    """
    mode = _upper_mode(writable, upper)
    if not isinstance(config, ImageConfig):
        config = ImageConfig.load(config)

    lowers: list[Layer] = []
    top: WritableUpper | None = None
    try:
        lowers = open_lowers(config, session)
        if mode != "none" and not config.upper.is_empty:
            top = open_upper(config, readonly=mode == "readonly")
        stack = LayerStack(lowers, top, check_uuid_chain=check_uuid_chain)
    except Exception as exc:
        for layer in [*lowers, *([top] if top is not None else [])]:
            layer.close()
        if report_result:
            write_result(config, f"failed:{exc}")
        raise

    if report_result:
        write_result(config, "success")
    log.info(
        "opened image: %d lowers, %s, virtual size %d",
        len(lowers),
        "no upper" if top is None else ("upper read-only" if top.readonly else "upper writable"),
        stack.size,
    )
    return stack


def _upper_mode(writable: bool, upper: UpperMode | None) -> UpperMode:
    if upper is None:
        return "writable" if writable else "none"
    if upper not in UPPER_MODES:
        raise ValueError(f"upper={upper!r}: expected one of {', '.join(UPPER_MODES)}")
    if not writable and upper != "none":
        raise ValueError(
            f"writable=False contradicts upper={upper!r}; pass upper alone (writable is the "
            "older shorthand)"
        )
    return upper


def open_lowers(config: ImageConfig, session: RegistrySession | None = None) -> list[Layer]:
    """Open the config's lowers as read-only layers, bottom first (closed again on failure).

    Remote lowers are read through `session`, or the default session if none is given.
    """
    from workbench.image.layer import ReadOnlyLayer

    lowers = config.lowers
    if config.acceleration_layer and lowers:
        log.info("leaving out the acceleration layer (last lower): it holds a trace")
        lowers = lowers[:-1]

    opened: list[Layer] = []
    try:
        for position, lower in enumerate(lowers):
            _check_not_turbo(lower, f"lowers[{position}]")
            source = config.resolve_lower(lower)
            if isinstance(source, RemoteBlob):
                source = _open_remote(source, session)
            opened.append(ReadOnlyLayer.open(source))
    except BaseException:
        for layer in opened:
            layer.close()
        raise
    return opened


def _open_remote(blob: RemoteBlob, session: RegistrySession | None) -> RandomAccessFile:
    from workbench.registry.session import default_session

    session = session if session is not None else default_session()
    return session.open_blob(blob.repo_blob_url, blob.digest, blob.size or None)


def open_upper(config: ImageConfig, readonly: bool = False) -> WritableUpper:
    """Open the config's writable layer (data file, and index file unless it is sparse).

    With `readonly` the files are opened O_RDONLY and nothing is repaired on disk
    (`WritableLayer.open`).
    """
    from workbench.image.writable import WritableLayer

    upper = config.upper
    if upper.target or upper.gzip_index:
        raise UnsupportedFormatError(
            "upper has a TurboOCI target or gzipIndex: writable warp layers are not supported yet"
        )
    data = config.resolve_path(upper.data)
    if not data.is_file():
        raise ImageConfigError(f"upper.data {data} not found; create the writable layer first")
    index = config.resolve_path(upper.index) if upper.index else None
    return WritableLayer.open(data, index, readonly=readonly)


def write_result(config: ImageConfig, result: str) -> None:
    """Write `result` (``success`` or ``failed:<reason>``) to the config's resultFile.

    Nothing happens when the config names no resultFile. A failure to write is logged, not
    raised: the result file is a report, and the outcome it reports matters more.
    """
    if not config.result_file:
        return
    path = config.resolve_path(config.result_file)
    try:
        Path(path).write_text(result)
    except OSError as exc:
        log.warning("could not write the result %r to %s: %s", result, path, exc)


def _check_not_turbo(lower: LowerConfig, where: str) -> None:
    if lower.target_file or lower.target_digest or lower.gzip_index:
        raise UnsupportedFormatError(
            f"{where} is a TurboOCI layer (targetFile, targetDigest or gzipIndex): warp "
            "layers are not supported yet"
        )
