"""Unwrapping a layer blob: tar, then ZFile, down to the LSMT file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from reference import TESTDATA, needs_testdata

from workbench.blobs.common import BytesFile
from workbench.errors import ChecksumError
from workbench.formats.detect import open_blob, unwrap
from workbench.formats.tar import TarPayload, TarWriter
from workbench.formats.zfile import ZFileReader, ZFileWriter


def tar_wrapped_zfile(payload: bytes, **options: object) -> bytes:
    out = io.BytesIO()
    tar = TarWriter(out)
    writer = ZFileWriter(tar, **options)  # type: ignore[arg-type]
    writer.write(payload)
    writer.close()
    tar.close()
    return out.getvalue()


@needs_testdata
@pytest.mark.parametrize("overwrite_header", [False, True])
def test_tar_wrapped_zfile_of_layer1_unwraps_to_layer1(overwrite_header: bool) -> None:
    lsmt = (TESTDATA / "layer1.lsmt").read_bytes()
    blob = tar_wrapped_zfile(lsmt, algorithm="zstd", overwrite_header=overwrite_header)
    unwrapped = unwrap(BytesFile(blob, "layer1.tar"))
    assert unwrapped.layers == ("tar", "zfile")
    assert isinstance(unwrapped.tar, TarPayload) and unwrapped.tar.offset == 1536
    assert isinstance(unwrapped.zfile, ZFileReader) and unwrapped.file is unwrapped.zfile
    assert unwrapped.file.size == len(lsmt)
    assert unwrapped.file.pread(0, len(lsmt)) == lsmt
    assert unwrapped.name == "layer1.tar"


@needs_testdata
def test_open_blob_on_reference_files() -> None:
    with open_blob(TESTDATA / "layer1.commit-z.lz4.zfile") as blob:
        assert blob.layers == ("zfile",) and blob.tar is None
        assert blob.file.pread(0, 8) == b"LSMT\0\1\2\0"
    with open_blob(TESTDATA / "layer1.lsmt") as blob:
        assert blob.layers == () and blob.file is blob.source
        assert blob.file.size == (TESTDATA / "layer1.lsmt").stat().st_size


def test_tar_without_zfile() -> None:
    out = io.BytesIO()
    tar = TarWriter(out)
    tar.write(b"LSMT" + bytes(8188))
    tar.close()
    unwrapped = unwrap(BytesFile(out.getvalue()))
    assert unwrapped.layers == ("tar",) and unwrapped.zfile is None
    assert unwrapped.file.pread(0, 4) == b"LSMT"


def test_corrupt_zfile_header_is_reported_not_passed_on_raw() -> None:
    blob = bytearray(tar_wrapped_zfile(b"x" * 10000))
    blob[1536 + 100] ^= 1  # header padding of the ZFile, covered by its digest
    with pytest.raises(ChecksumError, match="digest mismatch"):
        unwrap(BytesFile(bytes(blob)))


def test_open_blob_closes_the_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.zfile"
    blob = bytearray(tar_wrapped_zfile(b"x" * 10000))
    blob[1536 + 100] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError):
        open_blob(path)
