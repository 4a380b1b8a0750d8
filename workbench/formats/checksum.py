"""CRC32C as OverlayBD computes it: Castagnoli, no initial inversion, no final XOR.

OverlayBD (through PhotonLibOS) uses the "raw" form of CRC32C: the register starts at the
given seed and is returned as is. The common library form (`crc32c.crc32c`) inverts the
register on the way in and on the way out, so the raw value is obtained by inverting both
ends: ``raw(d, s) = crc32c(d, s ^ 0xFFFFFFFF) ^ 0xFFFFFFFF``. This matches the header digests
of the reference files made by OverlayBD's own tools (shared/testdata/overlaybd).

Seeds in use (spec section 2.4):
- `SEED_HEADER` (0) for the ZFile header/trailer digest and the index CRC;
- `SEED_BLOCK` (100007) for the CRC stored after each compressed ZFile block.

Caveats:
- the library releases the GIL only for large buffers; for 4 KiB blocks the call overhead
  (about 0.1 us) dominates, which is why hot loops call `crc32c.crc32c` directly with the
  precomputed `INIT_BLOCK` instead of going through `crc32c_raw`.
"""

from __future__ import annotations

from typing import Final

import crc32c as _crc32c

__all__ = ["INIT_BLOCK", "MASK32", "SEED_BLOCK", "SEED_HEADER", "crc32c_raw"]

MASK32: Final = 0xFFFFFFFF

SEED_HEADER: Final = 0
"""Seed of the ZFile header digest and of the index CRC."""

SEED_BLOCK: Final = 100007
"""Seed of the per-block CRC of a ZFile (0x186A7)."""

INIT_BLOCK: Final = SEED_BLOCK ^ MASK32
"""`SEED_BLOCK` as the library's initial value: ``crc32c.crc32c(d, INIT_BLOCK) ^ MASK32``."""


def crc32c_raw(data: bytes | bytearray | memoryview, seed: int = SEED_HEADER) -> int:
    """The raw CRC32C of `data` starting from `seed` (no inversion in or out)."""
    return _crc32c.crc32c(data, seed ^ MASK32) ^ MASK32
