"""Sample data and small blobs that several test modules build."""

from __future__ import annotations

import io
import random

from workbench.formats.zfile import ZFileWriter


def make_zfile(data: bytes, **options: object) -> bytes:
    """`data` as a ZFile in memory, written with `ZFileWriter(**options)`."""
    out = io.BytesIO()
    writer = ZFileWriter(out, **options)  # type: ignore[arg-type]
    writer.write(data)
    writer.close()
    return out.getvalue()


def sample_data(size: int, seed: int = 1) -> bytes:
    """Half compressible text, half random bytes, so blocks both shrink and grow."""
    rng = random.Random(seed)
    text = b"the quick brown fox jumps over the lazy dog %d\n"
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.5:
            out += text % rng.randrange(1000) * 20
        else:
            out += rng.randbytes(3000)
    return bytes(out[:size])
