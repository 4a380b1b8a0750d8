"""Image conversion: OCI/Docker images -> OverlayBD images, and verification of the result.

`convert_image` (`workbench.convert.convert`) and `verify_image` (`workbench.convert.verify`)
are the entry points; `oci` reads sources, `apply` applies a layer tar with OCI semantics,
`ext4` makes the file system and normalises it.
"""

from workbench.convert.convert import ConversionReport, LayerReport, convert_image
from workbench.convert.verify import Difference, VerifyReport, verify_image

__all__ = [
    "ConversionReport",
    "Difference",
    "LayerReport",
    "VerifyReport",
    "convert_image",
    "verify_image",
]
