"""The workbench's exceptions.

Every error the workbench raises on bad input derives from `WorkbenchError`. Subclasses also
inherit the builtin that matches them (`ValueError`, `FileNotFoundError`, ...), so callers that
only know the builtins still catch them.

Messages are lowercase, name the file (or blob), the offset and the broken rule, show the
expected and the actual value where there is one, and say what to do when there is a remedy.
"""

from __future__ import annotations

__all__ = [
    "AlignmentError",
    "ChecksumError",
    "CorruptFileError",
    "FormatError",
    "ImageConfigError",
    "LayerStackError",
    "ReadOnlyError",
    "UnsupportedFormatError",
    "WorkbenchError",
]


class WorkbenchError(Exception):
    """Base of every error the workbench raises on purpose."""


class FormatError(WorkbenchError, ValueError):
    """Raised when a file is not of the format it was opened as (wrong magic, wrong kind)."""


class CorruptFileError(FormatError):
    """Raised when a file has the right magic but breaks a rule of its format.

    Truncation, an index entry out of range, overlapping segments and impossible header
    fields all land here; the message names the file, the offset and the rule.
    """


class ChecksumError(CorruptFileError):
    """Raised when a stored CRC32C does not match the bytes it covers."""


class UnsupportedFormatError(FormatError):
    """Raised for a valid file that uses a feature the workbench does not implement."""


class AlignmentError(WorkbenchError, ValueError):
    """Raised when an LSMT read, write or trim is not aligned to 512-byte sectors."""


class LayerStackError(WorkbenchError, ValueError):
    """Raised when layers cannot be stacked (too many, mismatched sizes, broken uuid chain)."""


class ReadOnlyError(WorkbenchError, PermissionError):
    """Raised when a write or trim reaches an image that has no writable layer."""


class ImageConfigError(WorkbenchError, ValueError):
    """Raised when a config.v1.json is malformed or names layers that cannot be found."""
