"""Random-access sources of bytes: local files, in-memory blobs, and (later) registry blobs."""

from workbench.blobs.common import BytesFile, LocalFile, RandomAccessFile, read_exact

__all__ = ["BytesFile", "LocalFile", "RandomAccessFile", "read_exact"]
