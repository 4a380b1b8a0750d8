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
    "AuthenticationError",
    "BlobNotFoundError",
    "BuildError",
    "ChecksumError",
    "CorruptFileError",
    "DefinitionError",
    "DigestMismatchError",
    "ExperimentError",
    "FormatError",
    "ImageConfigError",
    "ImageReferenceError",
    "LayerError",
    "LayerStackError",
    "ManifestError",
    "ManifestNotFoundError",
    "PeerError",
    "ProbeError",
    "ProbeTimeoutError",
    "RangeError",
    "ReadOnlyError",
    "RecipeError",
    "RegistryError",
    "RegistryTimeoutError",
    "SnapshotArgumentError",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "SnapshotStateError",
    "UnsupportedFormatError",
    "UnsupportedImageError",
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


class LayerError(FormatError):
    """Raised when an image layer cannot be applied: a corrupt or truncated archive, an entry
    whose path escapes the root, a diff_id that does not match, a layer larger than the disk.

    The message names the layer (digest), the entry where there is one, and what to do.
    """


class LayerStackError(WorkbenchError, ValueError):
    """Raised when layers cannot be stacked (too many, mismatched sizes, broken uuid chain)."""


class ReadOnlyError(WorkbenchError, PermissionError):
    """Raised when a write or trim reaches an image that has no writable layer."""


class ImageConfigError(WorkbenchError, ValueError):
    """Raised when a config.v1.json is malformed or names layers that cannot be found."""


# Registry errors (workbench.registry). Messages name the registry, the repository, the blob
# digest, the byte range, the last HTTP status or exception, and the attempts made.


class ImageReferenceError(WorkbenchError, ValueError):
    """Raised when an image reference does not parse; the message names the broken rule."""


class RegistryError(WorkbenchError, OSError):
    """Raised when a registry request fails for good (after the retries it was allowed)."""


class BlobNotFoundError(RegistryError, FileNotFoundError):
    """Raised when the registry answers 404 for a blob."""


class ManifestNotFoundError(RegistryError, FileNotFoundError):
    """Raised when the registry answers 404 for a manifest (unknown tag or digest)."""


class AuthenticationError(RegistryError, PermissionError):
    """Raised on 401 after a token refresh, on 403, and when a token endpoint refuses."""


class RangeError(RegistryError, ValueError):
    """Raised for a byte range outside the blob (bad request or 416 from the registry)."""


class RegistryTimeoutError(RegistryError, TimeoutError):
    """Raised when a registry call runs past its total deadline."""


class DigestMismatchError(RegistryError, ValueError):
    """Raised when fetched bytes do not hash to the digest they were requested by."""


class ManifestError(RegistryError, ValueError):
    """Raised for a manifest that is malformed, unsupported, or has no matching platform."""


class UnsupportedImageError(ManifestError):
    """Raised when an image is not one the workbench reads as OverlayBD block layers.

    A layer without OverlayBD annotations (a plain OCI image), a TurboOCI layer, an
    acceleration layer below the top, or annotations that contradict the layer descriptor.
    The message names the image, the layer (index and digest) and what to do.
    """


# Snapshotter errors (workbench.snapshotter). Each maps onto the gRPC status containerd turns
# into its own error class (errdefs), so its callers can tell them apart.


class SnapshotNotFoundError(WorkbenchError, LookupError):
    """Raised when a snapshot key or a parent does not exist (gRPC NOT_FOUND)."""


class SnapshotExistsError(WorkbenchError, FileExistsError):
    """Raised when a snapshot key or commit name is taken (gRPC ALREADY_EXISTS).

    Also the answer to a Prepare whose target is a remote layer the snapshotter made at
    once (nothing to fetch or unpack), as containerd's remote snapshot protocol expects.
    """


class SnapshotStateError(WorkbenchError, ValueError):
    """Raised when a snapshot is in the wrong state for a call (gRPC FAILED_PRECONDITION).

    Committing a snapshot that is not active, removing one that has children, asking the
    mounts of a committed one.
    """


class SnapshotArgumentError(WorkbenchError, ValueError):
    """Raised for a request that can never succeed as given (gRPC INVALID_ARGUMENT).

    A parent that is not committed, an update of a field other than labels, an unknown
    writable mode.
    """


# Experiment errors (workbench.experiments).


class DefinitionError(WorkbenchError, ValueError):
    """Raised when an experiment definition is unreadable or names something unknown."""


class ExperimentError(WorkbenchError, RuntimeError):
    """Raised when a trial of an experiment cannot run or its workload does not get ready."""


# Evaluation images (workbench.datasets).


class RecipeError(WorkbenchError, ValueError):
    """Raised for a dataset recipe that does not parse or breaks a rule (names file and key)."""


class BuildError(WorkbenchError, RuntimeError):
    """Raised when a step of an image build fails; names the image, the layer and the output."""


class ProbeError(WorkbenchError, RuntimeError):
    """Raised when a workload can no longer become ready (its output ended, it exited)."""


class ProbeTimeoutError(ProbeError, TimeoutError):
    """Raised when a workload is not ready by the deadline; carries the last evidence seen."""


class PeerError(WorkbenchError, OSError):
    """Raised when a P2P peer cannot start, or an agent finds no parent that answers."""
