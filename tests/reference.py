"""OverlayBD's reference files, shared/testdata/overlaybd, and what they must read back to.

The files were made by OverlayBD's own tools (their README says how); `manifest.json` lists
the writes and trims of each layer and the sha256 of every 1 MiB chunk of the disk they give.
Tests that need the files carry `needs_testdata`: they skip where shared/ is absent (a bare
checkout), but under CI (CI set in the environment) a missing folder fails the run instead,
so that the compatibility tests can never pass by skipping.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

MiB = 1 << 20


def _find_testdata() -> Path:
    """The reference folder: $WORKBENCH_TESTDATA, else shared/ beside the checkout or beside
    one of its parents (a CI clone may sit deeper), else the workplace's /work/shared."""
    if os.environ.get("WORKBENCH_TESTDATA"):
        return Path(os.environ["WORKBENCH_TESTDATA"])
    checkout = Path(__file__).resolve().parents[1]
    candidates = [parent / "shared" / "testdata" / "overlaybd" for parent in checkout.parents]
    candidates.append(Path("/work/shared/testdata/overlaybd"))
    for candidate in candidates:
        if (candidate / "manifest.json").is_file():
            return candidate
    return candidates[0]


TESTDATA = _find_testdata()

if os.environ.get("CI") and not (TESTDATA / "manifest.json").is_file():
    raise RuntimeError(
        f"OverlayBD reference files are missing at {TESTDATA}; CI must run the compatibility "
        "tests: put shared/ beside the checkout or set WORKBENCH_TESTDATA"
    )

needs_testdata = pytest.mark.skipif(
    not (TESTDATA / "manifest.json").is_file(),
    reason=f"OverlayBD reference files not found at {TESTDATA}",
)


@functools.cache
def manifest() -> dict:
    return json.loads((TESTDATA / "manifest.json").read_text())


def expected_disk(layer_number: int) -> tuple[bytearray, np.ndarray]:
    """The disk one layer alone reads as (its manifest ops on zeros) and its mapped sectors."""
    info = manifest()
    disk = bytearray(info["virtual_size"])
    mapped = np.zeros(info["virtual_size"] // 512, bool)
    for op in info["layers"][layer_number - 1]["ops"]:
        start, length = op["offset"], op["length"]
        if op["op"] == "write":
            with open(TESTDATA / op["src"], "rb") as src:
                src.seek(op["src_offset"])
                disk[start : start + length] = src.read(length)
        else:
            disk[start : start + length] = bytes(length)
        mapped[start // 512 : (start + length) // 512] = True
    return disk, mapped


def chunk_hashes(data: bytes) -> list[str]:
    """sha256 of every 1 MiB chunk, as the manifest lists them."""
    return [hashlib.sha256(data[i : i + MiB]).hexdigest() for i in range(0, len(data), MiB)]
