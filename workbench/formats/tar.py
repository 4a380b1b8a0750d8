"""Tar wrapping: a layer blob is one file inside a tar, as OverlayBD pushes it to a registry.

Byte-compatible with containerd/overlaybd's tar adaptor (shared/specs/overlaybd-formats.md,
section 3). A registry layer is a tar by OCI's rules, so OverlayBD puts its layer file (an
LSMT commit, usually a ZFile) in a single-entry tar and reads the entry's bytes in place.

What OverlayBD writes (`TarWriter`)
    ===================  ==========================================================
    [0, 512)             PAX extended header "overlaybd.pax", typeflag 'x'
    [512, 1024)          PAX record block: "<L> size=<payload size>\\n", zero-padded
    [1024, 1536)         ustar header "overlaybd.commit", size field 0 (the PAX size wins)
    [1536, 1536 + N)     payload
    ...                  zero padding to a multiple of 512, then two zero blocks
    ===================  ==========================================================

    ustar header fields used (offset, size): name (0, 100), mode (100, 8), uid (108, 8),
    gid (116, 8), size (124, 12), mtime (136, 12), chksum (148, 8), typeflag (156, 1),
    linkname (157, 100), magic (257, 6) "ustar\\0", version (263, 2) "00", uname (265, 32),
    gname (297, 32), devmajor (329, 8), devminor (337, 8), prefix (345, 155).

    Numbers are octal text: mode "%6o " + NUL, uid/gid "     0 " + NUL, size and mtime
    "%11o " (no NUL). The checksum is "%6o " + NUL of the unsigned byte sum of the block,
    counting the checksum field as eight spaces. In the PAX header, mode, uid, gid, mtime,
    uname and gname are all NUL bytes.

    While the payload is written the first 1536 bytes hold a placeholder whose magic is
    "xxtar" (version "xx"), so a half-written file is never taken for a tar.

What a reader accepts (`TarPayload`)
    A file is a tar if its first 512 bytes have magic "ustar", version "00" and a checksum
    that matches the unsigned or the signed byte sum (`is_tar`). Headers are then walked:
    PAX ('x', 'g') and GNU long-name ('L', 'K') entries are consumed, and the first regular
    file entry is the payload. Its size is the PAX `size` record if positive, else the ustar
    size field. OverlayBD assumes the payload at 1536 when it saw a PAX header and at 512
    otherwise; walking the headers gives the same offsets for every file it writes, and the
    right one for any other layout (such as a Go `archive/tar` entry, payload at 512).

Caveats:
- only the first regular file of the tar is served; later entries are ignored;
- GNU old-style magic ("ustar  ") is not a tar for OverlayBD, so not for us either: such a
  file is used raw;
- sparse ('S') and other special entries are refused with `UnsupportedFormatError`.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import BinaryIO, Final

from workbench.blobs.common import LocalFile, RandomAccessFile, read_exact
from workbench.errors import CorruptFileError, FormatError, UnsupportedFormatError

__all__ = [
    "BLOCK",
    "PAYLOAD_OFFSET",
    "TarPayload",
    "TarWriter",
    "is_tar",
    "unwrap",
    "wrap",
]

log = logging.getLogger(__name__)

BLOCK: Final = 512
"""Tar block size: headers and padding are counted in these."""

PAYLOAD_OFFSET: Final = 3 * BLOCK
"""Where OverlayBD's writer puts the payload: after PAX header, PAX record, ustar header."""

PAX_NAME: Final = b"overlaybd.pax"
ENTRY_NAME: Final = b"overlaybd.commit"
PLACEHOLDER_NAME: Final = b"overlaybd.new"

MAX_EXTENSION_SIZE: Final = 1 << 20
"""Largest PAX or GNU long-name data a reader accepts (real ones are a few dozen bytes)."""

MAX_HEADERS: Final = 64
"""Headers walked before the payload at most; OverlayBD writes three."""

# Field slices of a ustar header block.
_NAME = slice(0, 100)
_MODE = slice(100, 108)
_UID = slice(108, 116)
_GID = slice(116, 124)
_SIZE = slice(124, 136)
_MTIME = slice(136, 148)
_CHKSUM = slice(148, 156)
_TYPEFLAG = 156
_MAGIC = slice(257, 263)
_VERSION = slice(263, 265)
_UNAME = slice(265, 297)
_GNAME = slice(297, 329)

_REGULAR_TYPES: Final = (b"0", b"\0", b"7")
_PAX_TYPES: Final = (b"x", b"g")
_GNU_LONG_TYPES: Final = (b"L", b"K")


# ---------------------------------------------------------------------------------------------
# Header blocks


def _checksums(block: bytes | bytearray) -> tuple[int, int]:
    """Unsigned and signed byte sums of a header, the checksum field counted as spaces."""
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:BLOCK])
    high = sum(1 for byte in block[:148] if byte >= 128)
    high += sum(1 for byte in block[156:BLOCK] if byte >= 128)
    return unsigned, unsigned - 256 * high


def _parse_number(field: bytes) -> int | None:
    """A numeric header field: octal text, or GNU base-256 if the top bit is set."""
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            return -1  # a negative base-256 number: no valid size or checksum
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def is_tar(head: bytes) -> bool:
    """True if `head` (the first 512 bytes of a file) is a ustar header, as OverlayBD checks.

    Magic "ustar" and version "00", and a checksum matching the unsigned or signed sum.
    """
    if len(head) < BLOCK or head[257:262] != b"ustar" or head[_VERSION] != b"00":
        return False
    stored = _parse_number(head[_CHKSUM])
    return stored is not None and stored in _checksums(head)


def _octal(value: int, width: int, terminator: bytes) -> bytes:
    """`value` as space-padded octal of `width` digits, then `terminator` (e.g. b" \\0")."""
    return b"%*o" % (width, value) + terminator


def _header_block(
    *,
    name: bytes,
    typeflag: bytes,
    size_field: bytes,
    mode: bytes = b"",
    owner: bytes = b"",
    mtime: bytes = b"",
    user: bytes = b"",
) -> bytes:
    """A ustar header block with its checksum; fields not given are NUL bytes."""
    block = bytearray(BLOCK)
    block[0 : len(name)] = name
    block[_MODE.start : _MODE.start + len(mode)] = mode
    block[_UID.start : _UID.start + len(owner)] = owner
    block[_GID.start : _GID.start + len(owner)] = owner
    block[_SIZE] = size_field
    block[_MTIME.start : _MTIME.start + len(mtime)] = mtime
    block[_TYPEFLAG] = typeflag[0]
    block[_MAGIC] = b"ustar\0"
    block[_VERSION] = b"00"
    block[_UNAME.start : _UNAME.start + len(user)] = user
    block[_GNAME.start : _GNAME.start + len(user)] = user
    block[_CHKSUM] = _octal(_checksums(block)[0], 6, b" \0")
    return bytes(block)


def pax_record(key: str, value: str) -> bytes:
    """One PAX record "<L> key=value\\n", L counting the whole record including its digits."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def overlaybd_headers(payload_size: int, mode: int = 0o100644) -> bytes:
    """The three 512-byte blocks OverlayBD writes in front of a payload of `payload_size`."""
    record = pax_record("size", str(payload_size))
    pax = _header_block(
        name=PAX_NAME,
        typeflag=b"x",
        size_field=_octal(len(record), 11, b" "),
    )
    entry = _header_block(
        name=ENTRY_NAME,
        typeflag=b"0",
        size_field=_octal(0, 11, b" "),
        mode=_octal(mode, 6, b" \0"),
        owner=_octal(0, 6, b" \0"),
        mtime=_octal(0, 11, b" "),
        user=b"root",
    )
    return pax + record.ljust(BLOCK, b"\0") + entry


def _placeholder() -> bytes:
    """What stands in front of the payload until `TarWriter.close()`: not a valid tar."""
    block = bytearray(BLOCK)
    block[0 : len(PLACEHOLDER_NAME)] = PLACEHOLDER_NAME
    block[257:262] = b"xxtar"
    block[_VERSION] = b"xx"
    return bytes(block) + bytes(BLOCK) + bytes(block)


# ---------------------------------------------------------------------------------------------
# Reader


class TarPayload:
    """The payload of a single-entry tar, as a random-access file.

    `offset` is where the payload starts in `source`, `size` its length. Raises
    `FormatError` if `source` does not start with a ustar header, `CorruptFileError` if the
    headers are malformed or the payload runs past the end of `source`.

    Closing the payload closes `source`.
    """

    def __init__(self, source: RandomAccessFile) -> None:
        self.source = source
        self.name = source.name
        head = source.pread(0, BLOCK)
        if not is_tar(head):
            raise FormatError(
                f"{self.name}: no valid ustar header at offset 0 (magic, version or "
                "checksum); not a tar"
            )
        self.offset, self._size, self.entry_name, self.saw_pax = self._walk_headers()
        if self.offset + self._size > source.size:
            raise CorruptFileError(
                f"{self.name}: tar payload of {self._size} bytes at offset {self.offset} "
                f"runs past the end of the file ({source.size} bytes); the file was cut short"
            )
        if self.offset != (PAYLOAD_OFFSET if self.saw_pax else BLOCK):
            log.debug("%s: tar payload at %d, not where OverlayBD expects", self.name, self.offset)

        # The optional `evict` capability exists only when the source has it (see blobs.common).
        if getattr(source, "evict", None) is not None:
            self.evict = self._evict

    def _evict(self, offset: int, length: int) -> None:
        """Forget the source's cached bytes of payload range [offset, offset + length)."""
        length = min(length, self._size - offset)
        if offset >= 0 and length > 0:
            self.source.evict(self.offset + offset, length)  # type: ignore[attr-defined]

    def _walk_headers(self) -> tuple[int, int, str, bool]:
        """Consume extension entries; returns (payload offset, size, entry name, saw PAX)."""
        position = 0
        pax_size = 0
        saw_pax = False
        long_name: bytes | None = None
        for _ in range(MAX_HEADERS):
            header = read_exact(self.source, position, BLOCK, "tar header")
            if not header.strip(b"\0"):
                raise CorruptFileError(
                    f"{self.name}: tar at offset {position}: end-of-archive before any file "
                    "entry; the tar holds no payload"
                )
            stored = _parse_number(header[_CHKSUM])
            if stored is None or stored not in _checksums(header):
                raise CorruptFileError(
                    f"{self.name}: tar header at offset {position}: checksum mismatch "
                    f"(stored {header[_CHKSUM]!r}, computed {_checksums(header)[0]:o})"
                )
            size = _parse_number(header[_SIZE])
            if size is None or size < 0:
                raise CorruptFileError(
                    f"{self.name}: tar header at offset {position}: bad size field "
                    f"{header[_SIZE]!r}"
                )
            typeflag = header[_TYPEFLAG : _TYPEFLAG + 1]
            data_at = position + BLOCK
            next_header = data_at + -(-size // BLOCK) * BLOCK

            if typeflag in _PAX_TYPES or typeflag in _GNU_LONG_TYPES:
                data = self._extension_data(data_at, size, typeflag)
                if typeflag in _PAX_TYPES:
                    saw_pax = True
                    records = self._pax_records(data, data_at)
                    pax_size = int(records.get("size", pax_size) or 0)
                elif typeflag == b"L":
                    long_name = data.split(b"\0", 1)[0]
                position = next_header
                continue

            if typeflag not in _REGULAR_TYPES:
                raise UnsupportedFormatError(
                    f"{self.name}: tar entry at offset {position} has type {typeflag!r}; "
                    "only a regular file can hold a layer payload"
                )
            name = long_name if long_name is not None else header[_NAME].split(b"\0", 1)[0]
            payload_size = pax_size if pax_size > 0 else size
            return data_at, payload_size, name.decode("utf-8", "replace"), saw_pax

        raise CorruptFileError(
            f"{self.name}: no regular file among the first {MAX_HEADERS} tar headers"
        )

    def _extension_data(self, at: int, size: int, typeflag: bytes) -> bytes:
        if size > MAX_EXTENSION_SIZE:
            raise CorruptFileError(
                f"{self.name}: tar {typeflag.decode('ascii', 'replace')!r} entry at offset "
                f"{at - BLOCK} holds {size} bytes; at most {MAX_EXTENSION_SIZE} accepted"
            )
        return read_exact(self.source, at, size, "tar extended header data")

    def _pax_records(self, data: bytes, at: int) -> dict[str, str]:
        """Parse "<L> key=value\\n" records; raises `CorruptFileError` on a malformed one."""
        records: dict[str, str] = {}
        position = 0
        while position < len(data) and data[position] != 0:
            space = data.find(b" ", position)
            try:
                length = int(data[position:space])
            except ValueError:
                length = 0
            record = data[position : position + length]
            if space < 0 or length <= 0 or len(record) != length or record[-1:] != b"\n":
                raise CorruptFileError(
                    f"{self.name}: malformed PAX record at offset {at + position}"
                )
            key, sep, value = record[space - position + 1 : -1].partition(b"=")
            if not sep:
                raise CorruptFileError(
                    f"{self.name}: PAX record at offset {at + position} has no '='"
                )
            records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
            position += length
        if "size" in records and not records["size"].isdigit():
            raise CorruptFileError(
                f"{self.name}: PAX size record {records['size']!r} at offset {at} is not "
                "a decimal number"
            )
        return records

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self._size:
            return b""
        return self.source.pread(self.offset + offset, min(length, self._size - offset))

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> TarPayload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TarPayload({self.name!r}, offset={self.offset}, size={self._size})"


# ---------------------------------------------------------------------------------------------
# Writer


class TarWriter:
    """A file-like writer that wraps what is written into OverlayBD's single-entry tar.

    `write`, `seek` and `tell` work in payload offsets, so a `ZFileWriter` can write
    through it (and seek back to rewrite its header). The payload starts at
    `out.tell() + 1536`. `close(mode)` writes the padding, the end-of-archive blocks and the
    real headers over the placeholder. Does not close `out`.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self._base = out.tell()
        self._position = 0
        self._size = 0
        self.closed = False
        out.write(_placeholder())

    def write(self, data: bytes | bytearray | memoryview) -> int:
        written = self.out.write(data)
        written = len(memoryview(data)) if written is None else written
        self._position += written
        self._size = max(self._size, self._position)
        return written

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or offset < 0:
            raise ValueError("TarWriter seeks only to absolute, non-negative payload offsets")
        self.out.seek(self._base + PAYLOAD_OFFSET + offset)
        self._position = offset
        return offset

    @property
    def payload_size(self) -> int:
        return self._size

    def close(self, mode: int = 0o100644) -> None:
        """Finish the tar: padding, two zero blocks, and the headers at the front."""
        if self.closed:
            return
        end = self._base + PAYLOAD_OFFSET + self._size
        self.out.seek(end)
        self.out.write(bytes(-self._size % BLOCK + 2 * BLOCK))
        self.out.seek(self._base)
        self.out.write(overlaybd_headers(self._size, mode))
        self.out.seek(0, os.SEEK_END)
        self.closed = True


# ---------------------------------------------------------------------------------------------
# File helpers

_COPY_CHUNK: Final = 1 << 20


def wrap(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str]) -> int:
    """Wrap the file at `src_path` into OverlayBD's tar at `dst_path`; returns payload bytes.

    The ustar mode is that of the source file. Writes `dst_path` directly.
    """
    mode = os.stat(src_path).st_mode
    mode = stat.S_IFREG | stat.S_IMODE(mode)
    with open(src_path, "rb") as src, open(dst_path, "wb") as dst:
        writer = TarWriter(dst)
        while chunk := src.read(_COPY_CHUNK):
            writer.write(chunk)
        writer.close(mode)
    return writer.payload_size


def unwrap(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str]) -> int:
    """Copy the payload of the tar at `src_path` to `dst_path`; returns its size."""
    source = LocalFile(src_path)
    try:
        payload = TarPayload(source)
    except BaseException:
        source.close()
        raise
    with payload, open(dst_path, "wb") as dst:
        for offset in range(0, payload.size, _COPY_CHUNK):
            wanted = min(_COPY_CHUNK, payload.size - offset)
            dst.write(read_exact(payload, offset, wanted, "tar payload"))
        return payload.size
