"""Image conversion: OCI/Docker images -> OverlayBD images, and verification of the result.

`convert_image` (`workbench.convert.convert`) and `verify_image` (`workbench.convert.verify`)
are the entry points; `oci` reads sources, `apply` applies a layer tar with OCI semantics (in
a child process, ``python -m workbench.convert.apply``), `ext4` makes the file system and
normalises it. The names are loaded on first use, so that running the applier module does
not import it twice.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ConversionReport",
    "Difference",
    "LayerReport",
    "VerifyReport",
    "convert_image",
    "verify_image",
]

_HOMES = {
    "ConversionReport": "convert",
    "LayerReport": "convert",
    "convert_image": "convert",
    "Difference": "verify",
    "VerifyReport": "verify",
    "verify_image": "verify",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
