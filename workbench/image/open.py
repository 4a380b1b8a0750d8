"""Opening the image a config.v1.json describes, as OverlayBD's block handler does.

`open_image` reads the config (`workbench.formats.config`), opens every lower as a read-only
layer (tar and ZFile wrapping are detected by `ReadOnlyLayer.open`), the writable layer if the
config has one, and stacks them into a `LayerStack`. `write_result` reports the outcome to the
config's ``resultFile`` the way OverlayBD does, so tools that wait on that file (the
snapshotter) see ``success`` or ``failed:<reason>``.

Lower resolution follows `ImageConfig.resolve_lower`: a local file first, then the files in
the lower's ``dir``; a remote lower goes to the registry hook (not built yet).

Caveats:
- with ``accelerationLayer`` set, the last lower holds a prefetch trace, not disk data; it is
  left out of the stack as OverlayBD does, and the trace is not replayed;
- TurboOCI (warp) lowers and uppers are not supported yet.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from workbench.errors import ImageConfigError, UnsupportedFormatError
from workbench.formats.config import ImageConfig, LowerConfig
from workbench.image.stack import Layer, LayerStack, WritableUpper

__all__ = ["open_image", "open_lowers", "open_upper", "write_result"]

log = logging.getLogger(__name__)


def open_image(
    config: str | os.PathLike[str] | ImageConfig,
    writable: bool = True,
    *,
    check_uuid_chain: bool = False,
    report_result: bool = False,
) -> LayerStack:
    """Open the image of a config as one disk.

    Parameters
    ----------
    config
        A config.v1.json path, or an already parsed `ImageConfig`.
    writable
        Open the config's writable layer on top (if it has one). False gives a read-only view
        of the lowers only.
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
    if not isinstance(config, ImageConfig):
        config = ImageConfig.load(config)

    lowers: list[Layer] = []
    upper: WritableUpper | None = None
    try:
        lowers = open_lowers(config)
        if writable and not config.upper.is_empty:
            upper = open_upper(config)
        stack = LayerStack(lowers, upper, check_uuid_chain=check_uuid_chain)
    except Exception as exc:
        for layer in [*lowers, *([upper] if upper is not None else [])]:
            layer.close()
        if report_result:
            write_result(config, f"failed:{exc}")
        raise

    if report_result:
        write_result(config, "success")
    log.info(
        "opened image: %d lowers, %s, virtual size %d",
        len(lowers),
        "writable" if upper is not None else "read-only",
        stack.size,
    )
    return stack


def open_lowers(config: ImageConfig) -> list[Layer]:
    """Open the config's lowers as read-only layers, bottom first (closed again on failure)."""
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
            opened.append(ReadOnlyLayer.open(source))
    except BaseException:
        for layer in opened:
            layer.close()
        raise
    return opened


def open_upper(config: ImageConfig) -> WritableUpper:
    """Open the config's writable layer (data file, and index file unless it is sparse)."""
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
    return WritableLayer.open(data, index)


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
