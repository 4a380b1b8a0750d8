"""Tar wrapping: OverlayBD's exact headers, and reading any single-entry ustar tar."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.blobs.common import BytesFile
from workbench.errors import CorruptFileError, FormatError, UnsupportedFormatError
from workbench.formats import tar
from workbench.formats.tar import TarPayload, TarWriter, is_tar, pax_record


def wrapped(payload: bytes, mode: int = 0o100644) -> bytes:
    out = io.BytesIO()
    writer = TarWriter(out)
    writer.write(payload)
    writer.close(mode)
    return out.getvalue()


def go_style_tar(payload: bytes, name: str = "overlaybd.commit") -> bytes:
    """A single-entry ustar tar without PAX, as Go's archive/tar writes small files."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mode = 0o444
        archive.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def test_layout_matches_overlaybd() -> None:
    payload = bytes(range(256)) * 4823  # 1234688 bytes
    blob = wrapped(payload)
    pax, record, entry = blob[0:512], blob[512:1024], blob[1024:1536]

    assert pax[:13] == b"overlaybd.pax" and pax[156:157] == b"x"
    assert pax[100:124] == bytes(24) and pax[136:148] == bytes(12)  # mode/uid/gid/mtime NUL
    assert pax[265:329] == bytes(64)  # uname/gname NUL
    assert pax[124:136] == b"%11o " % 16 == b"         20 "
    assert pax[257:265] == b"ustar\x0000"
    assert record == b"16 size=1234688\n".ljust(512, b"\0")

    assert entry[:16] == b"overlaybd.commit" and entry[156:157] == b"0"
    assert entry[100:108] == b"100644 \0"
    assert entry[108:116] == entry[116:124] == b"     0 \0"
    assert entry[124:136] == b"          0 " and entry[136:148] == b"          0 "
    assert entry[265:269] == b"root" and entry[297:301] == b"root"
    for header in (pax, entry):
        summed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        assert header[148:156] == b"%6o \0" % summed

    assert blob[1536 : 1536 + len(payload)] == payload
    padded_end = 1536 + -(-len(payload) // 512) * 512
    assert len(blob) == padded_end + 1024
    assert blob[1536 + len(payload) :] == bytes(len(blob) - 1536 - len(payload))


def test_pax_record_length_counts_its_own_digits() -> None:
    assert pax_record("size", "1234567") == b"16 size=1234567\n"
    assert pax_record("size", "1") == b"9 size=1\n"
    assert pax_record("size", "1" * 95) == b"105 size=" + b"1" * 95 + b"\n"


def test_placeholder_is_not_a_tar_until_closed() -> None:
    out = io.BytesIO()
    writer = TarWriter(out)
    writer.write(b"payload")
    assert not is_tar(out.getvalue()[:512])
    assert out.getvalue()[257:262] == b"xxtar"
    writer.close()
    assert is_tar(out.getvalue()[:512])


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 100000])
def test_round_trip(size: int) -> None:
    payload = bytes(i * 7 % 251 for i in range(size))
    reader = TarPayload(BytesFile(wrapped(payload), "w.tar"))
    assert (reader.offset, reader.size, reader.saw_pax) == (1536, size, True)
    assert reader.entry_name == "overlaybd.commit"
    assert reader.pread(0, size + 10) == payload
    assert reader.pread(size // 2, 3) == payload[size // 2 : size // 2 + 3]
    assert reader.pread(size, 1) == b""


def test_python_tarfile_reads_our_tar() -> None:
    payload = b"hello overlaybd\n" * 1000
    with tarfile.open(fileobj=io.BytesIO(wrapped(payload, 0o100600))) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == ["overlaybd.commit"]
        assert members[0].size == len(payload) and members[0].mode & 0o7777 == 0o600
        assert archive.extractfile(members[0]).read() == payload


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_gnu_tar_reads_our_tar(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 3001
    archive = tmp_path / "layer.tar"
    archive.write_bytes(wrapped(payload))
    listing = subprocess.run(["tar", "-tvf", archive], capture_output=True, check=True)
    assert b"overlaybd.commit" in listing.stdout and str(len(payload)).encode() in listing.stdout
    assert listing.stderr == b""
    extracted = subprocess.run(["tar", "-xOf", archive], capture_output=True, check=True)
    assert extracted.stdout == payload


def test_go_style_ustar_payload_at_512() -> None:
    payload = b"LSMT" + bytes(5000)
    blob = go_style_tar(payload)
    assert is_tar(blob[:512])
    reader = TarPayload(BytesFile(blob))
    assert (reader.offset, reader.size, reader.saw_pax) == (512, len(payload), False)
    assert reader.pread(0, len(payload)) == payload


def test_python_pax_tar_with_long_name_is_walked() -> None:
    payload = b"x" * 3000
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("d" * 150 + "/layer")  # long name: goes into a PAX record
        info.size = len(payload)
        info.pax_headers = {"comment": "c" * 600}  # PAX data larger than one block
        archive.addfile(info, io.BytesIO(payload))
    reader = TarPayload(BytesFile(out.getvalue()))
    assert reader.offset == 512 + 1024 + 512  # PAX data takes two blocks
    assert reader.pread(0, 5000) == payload


def test_gnu_long_name_entry_is_consumed() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("n" * 200)
        info.size = 10
        archive.addfile(info, io.BytesIO(b"0123456789"))
    blob = out.getvalue()
    # Python writes GNU magic "ustar  "; OverlayBD only takes POSIX "ustar\0" + "00".
    assert not is_tar(blob[:512])
    blob = bytearray(blob)
    for at in (0, 1024):
        blob[257:265] = b"ustar\x0000"
        header = blob[at : at + 512]
        header[257:265] = b"ustar\x0000"
        header[148:156] = b" " * 8
        header[148:156] = b"%6o \0" % sum(header)
        blob[at : at + 512] = header
    reader = TarPayload(BytesFile(bytes(blob)))
    assert reader.entry_name == "n" * 200 and reader.pread(0, 10) == b"0123456789"


def test_signed_checksum_is_accepted() -> None:
    header = bytearray(wrapped(b"abc")[1024:1536])
    header[345] = 0xC8  # a high byte in prefix: signed and unsigned sums now differ
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    header[148:156] = b"%6o \0" % (unsigned - 256)  # one byte >= 128: counts -56, not 200
    assert is_tar(bytes(header))


def test_bad_checksum_is_not_a_tar() -> None:
    blob = bytearray(wrapped(b"abc"))
    blob[20] ^= 1
    assert not is_tar(bytes(blob[:512]))
    with pytest.raises(FormatError, match="no valid ustar header at offset 0"):
        TarPayload(BytesFile(bytes(blob), "bad.tar"))


def test_bad_checksum_in_a_later_header() -> None:
    blob = bytearray(wrapped(b"abc"))
    blob[1024 + 20] ^= 1
    with pytest.raises(CorruptFileError, match="tar header at offset 1024: checksum mismatch"):
        TarPayload(BytesFile(bytes(blob)))


def test_payload_past_end_of_file() -> None:
    blob = wrapped(b"a" * 5000)
    with pytest.raises(CorruptFileError, match="payload of 5000 bytes at offset 1536 runs past"):
        TarPayload(BytesFile(blob[:3000], "cut.tar"))


def test_directory_entry_is_refused() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("dir")
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
    with pytest.raises(UnsupportedFormatError, match="type b'5'"):
        TarPayload(BytesFile(out.getvalue()))


def test_wrap_and_unwrap_files(tmp_path: Path) -> None:
    src = tmp_path / "layer.lsmt"
    src.write_bytes(b"0123456789" * 70000)
    src.chmod(0o640)
    assert tar.wrap(src, tmp_path / "layer.tar") == 700000
    with tarfile.open(tmp_path / "layer.tar") as archive:
        assert archive.getmembers()[0].mode & 0o7777 == 0o640
    assert tar.unwrap(tmp_path / "layer.tar", tmp_path / "out") == 700000
    assert (tmp_path / "out").read_bytes() == src.read_bytes()


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=3000))
def test_random_bytes_raise_only_format_errors(blob: bytes) -> None:
    if is_tar(blob[:512]):
        try:
            TarPayload(BytesFile(blob))
        except FormatError:
            pass
    else:
        with pytest.raises(FormatError):
            TarPayload(BytesFile(blob))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 1535), st.integers(1, 255))
def test_damaged_headers_give_right_payload_or_an_error(position: int, mask: int) -> None:
    payload = b"payload bytes " * 100
    blob = bytearray(wrapped(payload))
    blob[position] ^= mask
    try:
        reader = TarPayload(BytesFile(bytes(blob)))
    except FormatError:
        return
    # Some header bytes do not matter (names, padding after the PAX record); a damaged
    # size record may only shrink or grow the payload inside the file.
    assert reader.offset == 1536
    data = reader.pread(0, reader.size)
    assert data[: len(payload)] == payload[: len(data)]
