"""SCSI commands over a `BlockHandler`: what a TCMU transport passes on, decoded and answered.

`execute(handler, cdb, data_out)` takes one command descriptor block and the data-out buffer
(for writes, UNMAP and WRITE SAME) and returns a `ScsiResult`: the status (GOOD or CHECK
CONDITION), the data-in buffer (already cut to the CDB's allocation length) and, on CHECK
CONDITION, fixed-format sense data. It never raises for a bad command: every failure becomes
sense data, as a target must answer. Fields follow SBC-3 (block commands) and SPC-4
(INQUIRY, MODE SENSE, sense data); multi-byte fields are big-endian.

Commands (opcode)::

    TEST UNIT READY      0x00   always GOOD (the image is open)
    INQUIRY              0x12   standard data; VPD 0x00, 0x80 serial, 0x83 device id,
                                0xB0 block limits, 0xB2 logical block provisioning
    MODE SENSE(6)/(10)   0x1A / 0x5A   header (WP for read-only images, DPOFUA), short or
                                long LBA block descriptor, caching (0x08) and control (0x0A)
                                pages, 0x3F for all
    READ CAPACITY(10)    0x25   last LBA (0xFFFFFFFF if it does not fit) and block length
    READ CAPACITY(16)    0x9E/0x10  last LBA, block length, LBPME and LBPRZ set
    READ(10)/(16)        0x28 / 0x88
    WRITE(10)/(16)       0x2A / 0x8A   FUA makes the write durable before GOOD
    SYNCHRONIZE CACHE    0x35 / 0x91   the writable layer fsynced (the range is checked only)
    UNMAP                0x42   block descriptors -> `BlockHandler.unmap`
    WRITE SAME(10)/(16)  0x41 / 0x93   UNMAP bit (a zero block trims), NDOB (16) for zeros

Errors -> sense key / additional sense code (ASC, ASCQ)::

    unknown opcode or service action     ILLEGAL REQUEST  INVALID COMMAND OPERATION CODE 20/00
    a field the device does not support  ILLEGAL REQUEST  INVALID FIELD IN CDB 24/00
                                         (sense-key specific field pointer to the byte)
    range past the last LBA              ILLEGAL REQUEST  LBA OUT OF RANGE 21/00
    UNMAP list too short / bad field     ILLEGAL REQUEST  PARAMETER LIST LENGTH ERROR 1A/00,
                                                          INVALID FIELD IN PARAMETER LIST 26/00
    change to a read-only image          DATA PROTECT     WRITE PROTECTED 27/00
    image I/O failure on read            MEDIUM ERROR     UNRECOVERED READ ERROR 11/00
    image I/O failure on a change        MEDIUM ERROR     WRITE ERROR 0C/00
    MODE SENSE of saved values           ILLEGAL REQUEST  SAVING PARAMETERS NOT SUPPORTED 39/00

I/O failures (a `WorkbenchError` such as a registry failure, or an `OSError`) are logged at
ERROR with their cause; the LBA of the command goes in the sense INFORMATION field.

Caveats:
- no READ(6)/WRITE(6), COMPARE AND WRITE, REPORT LUNS or REQUEST SENSE: the kernel's sd
  driver uses the 10/16-byte forms, and TCMU's target core answers REPORT LUNS itself; the
  others get INVALID COMMAND OPERATION CODE;
- no protection information: RDPROTECT/WRPROTECT other than 0 is an invalid field;
- SYNCHRONIZE CACHE flushes the whole writable layer whatever range it names; IMMED is
  accepted and the flush still completes before GOOD;
- MODE SELECT is not supported: the caching page reports WCE=1 and nothing can change it.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from typing import Final, NamedTuple

from workbench.device.handler import BlockHandler, LbaRangeError
from workbench.errors import ReadOnlyError, WorkbenchError

__all__ = ["ScsiError", "ScsiResult", "Sense", "execute"]

log = logging.getLogger(__name__)

# Status bytes (SAM-5).
GOOD: Final = 0x00
CHECK_CONDITION: Final = 0x02

# Sense keys (SPC-4 table 43).
NO_SENSE: Final = 0x0
MEDIUM_ERROR: Final = 0x3
ILLEGAL_REQUEST: Final = 0x5
DATA_PROTECT: Final = 0x7

# Additional sense code and qualifier pairs (SPC-4 annex D).
INVALID_COMMAND_OPERATION_CODE: Final = (0x20, 0x00)
INVALID_FIELD_IN_CDB: Final = (0x24, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST: Final = (0x26, 0x00)
PARAMETER_LIST_LENGTH_ERROR: Final = (0x1A, 0x00)
LBA_OUT_OF_RANGE: Final = (0x21, 0x00)
WRITE_PROTECTED: Final = (0x27, 0x00)
UNRECOVERED_READ_ERROR: Final = (0x11, 0x00)
WRITE_ERROR: Final = (0x0C, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED: Final = (0x39, 0x00)

# Opcodes.
TEST_UNIT_READY: Final = 0x00
INQUIRY: Final = 0x12
MODE_SENSE_6: Final = 0x1A
READ_CAPACITY_10: Final = 0x25
READ_10: Final = 0x28
WRITE_10: Final = 0x2A
SYNCHRONIZE_CACHE_10: Final = 0x35
WRITE_SAME_10: Final = 0x41
UNMAP: Final = 0x42
MODE_SENSE_10: Final = 0x5A
READ_16: Final = 0x88
WRITE_16: Final = 0x8A
SYNCHRONIZE_CACHE_16: Final = 0x91
WRITE_SAME_16: Final = 0x93
SERVICE_ACTION_IN_16: Final = 0x9E
READ_CAPACITY_16_ACTION: Final = 0x10

CDB_LENGTH: Final = {
    TEST_UNIT_READY: 6,
    INQUIRY: 6,
    MODE_SENSE_6: 6,
    READ_CAPACITY_10: 10,
    READ_10: 10,
    WRITE_10: 10,
    SYNCHRONIZE_CACHE_10: 10,
    WRITE_SAME_10: 10,
    UNMAP: 10,
    MODE_SENSE_10: 10,
    READ_16: 16,
    WRITE_16: 16,
    SYNCHRONIZE_CACHE_16: 16,
    WRITE_SAME_16: 16,
    SERVICE_ACTION_IN_16: 16,
}
"""Bytes of each supported CDB; the last byte is CONTROL."""

# Identity and limits the device reports.
VENDOR: Final = b"DADI    "
"""T10 vendor identification: 8 ASCII bytes, space-padded."""
PRODUCT: Final = b"workbench image "
"""Product identification: 16 ASCII bytes."""
REVISION: Final = b"0001"
MAX_TRANSFER_BYTES: Final = 4 << 20
"""Largest READ/WRITE the device takes (block limits VPD); OverlayBD splits I/O at 4 MiB."""
MAX_UNMAP_BLOCKS: Final = 0xFFFFFFFF
"""Largest total of blocks in one UNMAP (block limits VPD): trims only write entries."""
MAX_UNMAP_DESCRIPTORS: Final = 256
"""Most block descriptors in one UNMAP parameter list."""
MAX_WRITE_SAME_BLOCKS: Final = 0xFFFFFFFF
"""Largest WRITE SAME (block limits VPD); a non-zero block is written 1 MiB at a time."""
PREFERRED_BYTES: Final = 4096
"""Granularity the device prefers for transfers and unmaps (the page size ext4 writes)."""

VPD_PAGES: Final = (0x00, 0x80, 0x83, 0xB0, 0xB2)

UNMAP_HEADER: Final = struct.Struct(">HH4x")
"""UNMAP parameter list header: data length, block descriptor data length, reserved."""
UNMAP_DESCRIPTOR: Final = struct.Struct(">QI4x")
"""UNMAP block descriptor: LBA, number of blocks, reserved."""


class Sense(NamedTuple):
    """What went wrong, as fixed-format sense data reports it."""

    key: int
    asc: int
    ascq: int
    information: int | None = None
    field_pointer: int | None = None
    """Byte of the CDB (or parameter list) holding the bad field, for ILLEGAL REQUEST."""
    in_cdb: bool = True

    def to_bytes(self) -> bytes:
        """18 bytes of fixed-format sense data, current errors (SPC-4 4.5.3)."""
        sense = bytearray(18)
        sense[0] = 0x70
        if self.information is not None and self.information <= 0xFFFFFFFF:
            sense[0] |= 0x80  # VALID: the INFORMATION field holds the LBA
            struct.pack_into(">I", sense, 3, self.information)
        sense[2] = self.key
        sense[7] = len(sense) - 8  # additional sense length
        sense[12], sense[13] = self.asc, self.ascq
        if self.field_pointer is not None:
            sense[15] = 0x80 | (0x40 if self.in_cdb else 0)  # SKSV, C/D
            struct.pack_into(">H", sense, 16, self.field_pointer)
        return bytes(sense)


class ScsiResult(NamedTuple):
    """The answer to one command: status, data-in buffer and sense data (CHECK CONDITION)."""

    status: int
    data_in: bytes = b""
    sense: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == GOOD


class ScsiError(Exception):
    """A command that ends in CHECK CONDITION with `sense` (internal to `execute`)."""

    def __init__(self, sense: Sense) -> None:
        super().__init__(f"sense key {sense.key:#x}, asc/ascq {sense.asc:#04x}/{sense.ascq:#04x}")
        self.sense = sense


def _invalid_field(byte: int, in_cdb: bool = True) -> ScsiError:
    asc, ascq = INVALID_FIELD_IN_CDB if in_cdb else INVALID_FIELD_IN_PARAMETER_LIST
    return ScsiError(Sense(ILLEGAL_REQUEST, asc, ascq, field_pointer=byte, in_cdb=in_cdb))


def _sense(key: int, code: tuple[int, int], information: int | None = None) -> Sense:
    return Sense(key, code[0], code[1], information)


# ---------------------------------------------------------------------------------------------
# Dispatch


def execute(handler: BlockHandler, cdb: bytes, data_out: bytes | None = None) -> ScsiResult:
    """Run one SCSI command against `handler`; see the module docstring for what it answers."""
    cdb = bytes(cdb)
    try:
        data_in = _dispatch(handler, cdb, data_out or b"")
    except ScsiError as exc:
        return ScsiResult(CHECK_CONDITION, b"", exc.sense.to_bytes())
    return ScsiResult(GOOD, data_in, b"")


def _dispatch(handler: BlockHandler, cdb: bytes, data_out: bytes) -> bytes:
    if not cdb:
        raise _invalid_field(0)
    opcode = cdb[0]
    command = _COMMANDS.get(opcode)
    if command is None:
        raise ScsiError(_sense(ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE))
    if len(cdb) < CDB_LENGTH[opcode]:
        raise _invalid_field(len(cdb) - 1)

    # CONTROL: NACA asks for ACA handling, which the device does not do (NormACA = 0).
    control = CDB_LENGTH[opcode] - 1
    if cdb[control] & 0x04:
        raise _invalid_field(control)
    return command(handler, cdb, data_out)


# ---------------------------------------------------------------------------------------------
# Reads and writes


def _read(handler: BlockHandler, cdb: bytes, data_out: bytes) -> bytes:
    lba, blocks = _lba_and_length(cdb)
    if cdb[1] >> 5:  # RDPROTECT
        raise _invalid_field(1)
    _check_transfer(handler, lba, blocks, cdb)
    try:
        return handler.read(lba, blocks)
    except (WorkbenchError, OSError) as exc:
        raise _io_failure(handler, "read", lba, blocks, exc, UNRECOVERED_READ_ERROR) from exc


def _write(handler: BlockHandler, cdb: bytes, data_out: bytes) -> bytes:
    lba, blocks = _lba_and_length(cdb)
    if cdb[1] >> 5:  # WRPROTECT
        raise _invalid_field(1)
    _check_transfer(handler, lba, blocks, cdb)
    _check_writable(handler, lba)
    if len(data_out) != blocks * handler.block_size:
        # The transport hands over exactly the transfer length; anything else is its bug.
        raise _invalid_field(7 if len(cdb) == 10 else 10)
    fua = bool(cdb[1] & 0x08)
    try:
        handler.write(lba, data_out)
        if fua:
            handler.synchronize_cache()
    except (WorkbenchError, OSError) as exc:
        raise _io_failure(handler, "write", lba, blocks, exc, WRITE_ERROR) from exc
    return b""


def _lba_and_length(cdb: bytes) -> tuple[int, int]:
    """LBA and transfer length of a 10- or 16-byte READ, WRITE, WRITE SAME or SYNC CACHE."""
    if cdb[0] < 0x80:
        lba, blocks = struct.unpack_from(">IxH", cdb, 2)
    else:
        lba, blocks = struct.unpack_from(">QI", cdb, 2)
    return lba, blocks


def _check_range(handler: BlockHandler, lba: int, blocks: int) -> None:
    """LBA OUT OF RANGE unless [lba, lba + blocks) lies on the disk (and lba does, if 0)."""
    if lba + blocks > handler.blocks or lba >= handler.blocks:
        raise ScsiError(_sense(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE, lba))


def _check_transfer(handler: BlockHandler, lba: int, blocks: int, cdb: bytes) -> None:
    if blocks * handler.block_size > MAX_TRANSFER_BYTES:
        raise _invalid_field(7 if len(cdb) == 10 else 10)
    _check_range(handler, lba, blocks)


def _check_writable(handler: BlockHandler, lba: int | None = None) -> None:
    if handler.read_only:
        raise ScsiError(_sense(DATA_PROTECT, WRITE_PROTECTED, lba))


def _io_failure(
    handler: BlockHandler,
    what: str,
    lba: int,
    blocks: int,
    exc: BaseException,
    code: tuple[int, int],
) -> ScsiError:
    """MEDIUM ERROR for a failure of the image below the handler, logged with its cause."""
    if isinstance(exc, ReadOnlyError):
        return ScsiError(_sense(DATA_PROTECT, WRITE_PROTECTED, lba))
    if isinstance(exc, LbaRangeError):
        return ScsiError(_sense(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE, exc.lba))
    log.error(
        "%s: %s of blocks [%d, %d) failed, reported as MEDIUM ERROR: %s: %s",
        handler.name,
        what,
        lba,
        lba + blocks,
        type(exc).__name__,
        exc,
    )
    return ScsiError(_sense(MEDIUM_ERROR, code, lba))


# ---------------------------------------------------------------------------------------------
# Provisioning and durability


def _synchronize_cache(handler: BlockHandler, cdb: bytes, data_out: bytes) -> bytes:
    lba, blocks = _lba_and_length(cdb)
    if lba + blocks > handler.blocks or lba >= handler.blocks:
        raise ScsiError(_sense(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE, lba))
    try:
        handler.synchronize_cache()
    except (WorkbenchError, OSError) as exc:
        raise _io_failure(handler, "synchronize cache", lba, blocks, exc, WRITE_ERROR) from exc
    return b""


def _unmap(handler: BlockHandler, cdb: bytes, data_out: bytes) -> bytes:
    if cdb[1] & 0x01:  # ANCHOR: anchored LBAs are not supported (ANC_SUP = 0)
        raise _invalid_field(1)
    (list_length,) = struct.unpack_from(">H", cdb, 7)
    if list_length == 0:
        return b""
    if list_length < UNMAP_HEADER.size:
        raise ScsiError(_sense(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR))
    _check_writable(handler)
    parameters = bytes(data_out[:list_length])
    if len(parameters) < UNMAP_HEADER.size:
        raise ScsiError(_sense(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR))

    # Descriptors: as many whole ones as the header's length and the list both hold (SBC-3
    # 5.28.2: a partial descriptor at the end is ignored).
    _, descriptor_bytes = UNMAP_HEADER.unpack_from(parameters)
    available = min(descriptor_bytes, len(parameters) - UNMAP_HEADER.size)
    count = available // UNMAP_DESCRIPTOR.size
    if count > MAX_UNMAP_DESCRIPTORS:
        raise _invalid_field(2, in_cdb=False)
    ranges = [
        UNMAP_DESCRIPTOR.unpack_from(parameters, UNMAP_HEADER.size + i * UNMAP_DESCRIPTOR.size)
        for i in range(count)
    ]
    if sum(blocks for _, blocks in ranges) > MAX_UNMAP_BLOCKS:
        raise _invalid_field(UNMAP_HEADER.size + 8, in_cdb=False)
    for lba, blocks in ranges:
        if lba + blocks > handler.blocks:
            raise ScsiError(_sense(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE, lba))

    first = ranges[0][0] if ranges else 0
    try:
        handler.unmap(ranges)
    except (WorkbenchError, OSError) as exc:
        raise _io_failure(handler, "unmap", first, 0, exc, WRITE_ERROR) from exc
    return b""


def _write_same(handler: BlockHandler, cdb: bytes, data_out: bytes) -> bytes:
    lba, blocks = _lba_and_length(cdb)
    flags = cdb[1]
    if flags >> 5:  # WRPROTECT
        raise _invalid_field(1)
    if flags & 0x10:  # ANCHOR
        raise _invalid_field(1)
    if flags & 0x06:  # PBDATA, LBDATA: no physical or logical block data patterns
        raise _invalid_field(1)
    if blocks == 0:  # WSNZ = 1: a count of zero ("to the end") is not supported
        raise _invalid_field(7 if len(cdb) == 10 else 10)
    if blocks > MAX_WRITE_SAME_BLOCKS:
        raise _invalid_field(7 if len(cdb) == 10 else 10)
    _check_range(handler, lba, blocks)
    _check_writable(handler, lba)

    unmap = bool(flags & 0x08)
    no_data_out = len(cdb) == 16 and bool(flags & 0x01)  # NDOB: the block is zeros
    block = bytes(handler.block_size) if no_data_out else data_out
    if len(block) != handler.block_size:
        raise _invalid_field(1)
    try:
        handler.write_same(lba, blocks, block, unmap=unmap)
    except (WorkbenchError, OSError) as exc:
        raise _io_failure(handler, "write same", lba, blocks, exc, WRITE_ERROR) from exc
    return b""


# ---------------------------------------------------------------------------------------------
# Identity and geometry


def _test_unit_ready(handler: BlockHandler, cdb: bytes, data_out: bytes) -> bytes:
    return b""


def _read_capacity_10(handler: BlockHandler, cdb: bytes, data_out: bytes) -> bytes:
    # PMI (byte 8 bit 0) is obsolete in SBC-3; with it clear the LBA field must be zero.
    if not cdb[8] & 0x01 and struct.unpack_from(">I", cdb, 2)[0]:
        raise _invalid_field(2)
    last = handler.blocks - 1
    return struct.pack(">II", min(last, 0xFFFFFFFF), handler.block_size)


def _service_action_in(handler: BlockHandler, cdb: bytes, data_out: bytes) -> bytes:
    if cdb[1] & 0x1F != READ_CAPACITY_16_ACTION:
        raise ScsiError(_sense(ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE))
    (allocation,) = struct.unpack_from(">I", cdb, 10)

    # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: LSMT prefers 4 KiB, like a 512e disk.
    exponent = max(0, (PREFERRED_BYTES // handler.block_size).bit_length() - 1)
    lbpme_lbprz = 0x80 | 0x40  # thin provisioned; unmapped blocks read as zeros
    data = struct.pack(
        ">QIBBH16x", handler.blocks - 1, handler.block_size, 0, exponent, lbpme_lbprz << 8
    )
    return data[:allocation]


def _inquiry(handler: BlockHandler, cdb: bytes, data_out: bytes) -> bytes:
    evpd = cdb[1] & 0x01
    if cdb[1] & 0xFE:  # CMDDT (obsolete) and reserved bits
        raise _invalid_field(1)
    page = cdb[2]
    (allocation,) = struct.unpack_from(">H", cdb, 3)
    if not evpd:
        if page:
            raise _invalid_field(2)
        return _standard_inquiry()[:allocation]
    build = _VPD_BUILDERS.get(page)
    if build is None:
        raise _invalid_field(2)
    body = build(handler)
    return (struct.pack(">BBH", 0x00, page, len(body)) + body)[:allocation]


def _standard_inquiry() -> bytes:
    """36 bytes (SPC-4 6.6.2): a direct-access block device, SPC-4, command queuing."""
    return (
        struct.pack(
            ">BBBBBBBB",
            0x00,  # peripheral qualifier 0 (connected), device type 0 (direct access block)
            0x00,  # RMB = 0: not removable
            0x06,  # VERSION: SPC-4
            0x02,  # RESPONSE DATA FORMAT = 2
            36 - 5,  # ADDITIONAL LENGTH
            0x00,  # SCCS, ACC, TPGS, 3PC, PROTECT all clear
            0x00,
            0x02,  # CMDQUE: tagged command queuing
        )
        + VENDOR
        + PRODUCT
        + REVISION
    )


def _serial(handler: BlockHandler) -> bytes:
    """The unit serial number: the uuid of the stack's top layer, without dashes."""
    layers = handler.stack.layers
    uuid = layers[-1].uuid if layers else "0" * 32
    return uuid.replace("-", "").upper().encode("ascii")


def _vpd_supported(handler: BlockHandler) -> bytes:
    return bytes(VPD_PAGES)


def _vpd_serial(handler: BlockHandler) -> bytes:
    return _serial(handler)


def _vpd_device_identification(handler: BlockHandler) -> bytes:
    """Two designators of the logical unit (SPC-4 7.8.6): T10 vendor id based, and NAA 3.

    NAA 3 (locally assigned) carries 60 bits of the serial's sha256: the kernel prefers an NAA
    designator for /dev/disk/by-id names.
    """
    serial = _serial(handler)
    t10 = VENDOR + serial
    digest = int.from_bytes(hashlib.sha256(serial).digest()[:8], "big")
    naa = (0x3 << 60) | (digest & ((1 << 60) - 1))
    return (
        struct.pack(">BBBB", 0x02, 0x01, 0, len(t10))  # ASCII, LU, T10 vendor id based
        + t10
        + struct.pack(">BBBBQ", 0x01, 0x03, 0, 8, naa)  # binary, LU, NAA
    )


def _vpd_block_limits(handler: BlockHandler) -> bytes:
    """SBC-3 6.5.3, 0x3C bytes after the header."""
    block_size = handler.block_size
    granularity = max(1, PREFERRED_BYTES // block_size)
    max_transfer = MAX_TRANSFER_BYTES // block_size
    return struct.pack(
        ">BBHIIIIIIIQ20x",
        0x01,  # WSNZ: WRITE SAME with a count of zero is refused
        0,  # MAXIMUM COMPARE AND WRITE LENGTH: not supported
        granularity,  # OPTIMAL TRANSFER LENGTH GRANULARITY
        max_transfer,  # MAXIMUM TRANSFER LENGTH
        max_transfer,  # OPTIMAL TRANSFER LENGTH
        0,  # MAXIMUM PREFETCH LENGTH
        MAX_UNMAP_BLOCKS,  # MAXIMUM UNMAP LBA COUNT
        MAX_UNMAP_DESCRIPTORS,  # MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
        granularity,  # OPTIMAL UNMAP GRANULARITY
        0,  # UGAVALID = 0, UNMAP GRANULARITY ALIGNMENT
        MAX_WRITE_SAME_BLOCKS,  # MAXIMUM WRITE SAME LENGTH
    )


def _vpd_provisioning(handler: BlockHandler) -> bytes:
    """SBC-3 6.5.4: UNMAP and WRITE SAME (10 and 16) unmap, unmapped blocks read zeros."""
    lbpu, lbpws, lbpws10, lbprz = 0x80, 0x40, 0x20, 0x04
    thin = 0x02  # PROVISIONING TYPE: thin provisioned
    return struct.pack(">BBBB", 0, lbpu | lbpws | lbpws10 | lbprz, thin, 0)


_VPD_BUILDERS = {
    0x00: _vpd_supported,
    0x80: _vpd_serial,
    0x83: _vpd_device_identification,
    0xB0: _vpd_block_limits,
    0xB2: _vpd_provisioning,
}


# ---------------------------------------------------------------------------------------------
# MODE SENSE

CACHING_PAGE: Final = 0x08
CONTROL_PAGE: Final = 0x0A
ALL_PAGES: Final = 0x3F


def _mode_sense(handler: BlockHandler, cdb: bytes, data_out: bytes) -> bytes:
    six = cdb[0] == MODE_SENSE_6
    dbd = bool(cdb[1] & 0x08)
    long_lba = not six and bool(cdb[1] & 0x10)  # LLBAA
    control, page = cdb[2] >> 6, cdb[2] & 0x3F
    subpage = cdb[3]
    allocation = cdb[4] if six else struct.unpack_from(">H", cdb, 7)[0]
    if control == 3:
        raise ScsiError(_sense(ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED))
    if subpage:
        raise _invalid_field(3)
    if page not in (CACHING_PAGE, CONTROL_PAGE, ALL_PAGES):
        raise _invalid_field(2)

    # Changeable values (PC = 1) are all zero masks: MODE SELECT is not supported.
    changeable = control == 1
    pages = b""
    if page in (CACHING_PAGE, ALL_PAGES):
        pages += _caching_page(changeable)
    if page in (CONTROL_PAGE, ALL_PAGES):
        pages += _control_page(changeable)

    descriptor = b"" if dbd else _block_descriptor(handler, long_lba)
    # DEVICE-SPECIFIC PARAMETER (SBC-3 6.4.1): WP, and DPOFUA (DPO and FUA are understood).
    device_specific = (0x80 if handler.read_only else 0x00) | 0x10
    if six:
        length = 4 + len(descriptor) + len(pages) - 1
        header = struct.pack(">BBBB", length, 0, device_specific, len(descriptor))
    else:
        length = 8 + len(descriptor) + len(pages) - 2
        longlba = 0x01 if descriptor and long_lba else 0x00
        header = struct.pack(">HBBBxH", length, 0, device_specific, longlba, len(descriptor))
    return (header + descriptor + pages)[:allocation]


def _block_descriptor(handler: BlockHandler, long_lba: bool) -> bytes:
    """Short (8-byte) or long (16-byte) LBA mode parameter block descriptor (SBC-3 6.4.2)."""
    if long_lba:
        return struct.pack(">Q4xI", handler.blocks, handler.block_size)
    blocks = min(handler.blocks, 0xFFFFFFFF)
    return struct.pack(">IBBH", blocks, 0, handler.block_size >> 16, handler.block_size & 0xFFFF)


def _caching_page(changeable: bool) -> bytes:
    """Caching mode page (SBC-3 6.4.5), 20 bytes: WCE = 1, the writable layer is a cache
    that SYNCHRONIZE CACHE makes durable."""
    page = bytearray(20)
    page[0], page[1] = CACHING_PAGE, len(page) - 2
    if not changeable:
        page[2] = 0x04  # WCE
    return bytes(page)


def _control_page(changeable: bool) -> bytes:
    """Control mode page (SPC-4 7.5.8), 12 bytes: unrestricted reordering, the rest zero."""
    page = bytearray(12)
    page[0], page[1] = CONTROL_PAGE, len(page) - 2
    if not changeable:
        page[3] = 0x10  # QUEUE ALGORITHM MODIFIER = 1: unrestricted reordering allowed
    return bytes(page)


_COMMANDS = {
    TEST_UNIT_READY: _test_unit_ready,
    INQUIRY: _inquiry,
    MODE_SENSE_6: _mode_sense,
    MODE_SENSE_10: _mode_sense,
    READ_CAPACITY_10: _read_capacity_10,
    SERVICE_ACTION_IN_16: _service_action_in,
    READ_10: _read,
    READ_16: _read,
    WRITE_10: _write,
    WRITE_16: _write,
    SYNCHRONIZE_CACHE_10: _synchronize_cache,
    SYNCHRONIZE_CACHE_16: _synchronize_cache,
    UNMAP: _unmap,
    WRITE_SAME_10: _write_same,
    WRITE_SAME_16: _write_same,
}
