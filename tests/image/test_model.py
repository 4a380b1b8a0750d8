"""Model test of the whole image: random writes, trims, commits and reopens vs a bytearray.

A `LayerStack` of committed layers plus a writable upper must always read back like one plain
byte array that took the same writes and trims (trims read as zeros). Commits push the upper
as a new read-only layer under a fresh upper; reopens close everything and open the files
again, so the on-disk formats (index replay, commit, ZFile) are in the loop too.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from workbench.image.commit import commit_writable
from workbench.image.layer import ReadOnlyLayer
from workbench.image.stack import LayerStack
from workbench.image.writable import WritableLayer

SECTOR = 512
DISK = 1 << 20
DISK_SECTORS = DISK // SECTOR
MAX_LOWERS = 6

sectors = st.integers(0, DISK_SECTORS - 1)
lengths = st.integers(1, 256)  # up to 128 KiB per operation


def clamp(first: int, count: int) -> tuple[int, int]:
    """Byte offset and length of a sector range, cut to the disk."""
    count = min(count, DISK_SECTORS - first)
    return first * SECTOR, count * SECTOR


class ImageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="workbench-model-"))
        self.model = bytearray(DISK)
        self.lower_paths: list[Path] = []
        self.generation = 0
        self.stack: LayerStack | None = None

    # Building layers -----------------------------------------------------------------

    def new_upper(self, parent_uuid: str | None) -> WritableLayer:
        self.generation += 1
        data = self.directory / f"upper{self.generation}.data"
        index = self.directory / f"upper{self.generation}.index"
        return WritableLayer.create(data, index, DISK, parent_uuid=parent_uuid)

    def open_stack(self, upper: WritableLayer) -> None:
        lowers = [ReadOnlyLayer.open(path) for path in self.lower_paths]
        self.stack = LayerStack(lowers, upper, check_uuid_chain=True)

    def push_upper(self, compress: str | None) -> None:
        """Commit the upper as a new lower and put a fresh upper on top."""
        assert self.stack is not None and self.stack.upper is not None
        upper = self.stack.upper
        upper.flush()
        path = self.directory / f"lower{len(self.lower_paths)}.lsmt"
        commit_writable(upper, path, uuid=upper.uuid, compress=compress)
        uuid = upper.uuid
        self.stack.close()

        self.lower_paths.append(path)
        self.open_stack(self.new_upper(parent_uuid=uuid))

    @initialize(
        writes=st.lists(
            st.lists(st.tuples(sectors, lengths, st.binary(min_size=1, max_size=1)), max_size=4),
            min_size=1,
            max_size=3,
        )
    )
    def build_lowers(self, writes: list[list[tuple[int, int, bytes]]]) -> None:
        """1 to 3 committed layers, each from a few writes."""
        self.open_stack(self.new_upper(parent_uuid=None))
        for layer_writes in writes:
            for first, count, fill in layer_writes:
                self.write(first, count, fill)
            self.push_upper(compress=None)

    def teardown(self) -> None:
        if self.stack is not None:
            self.stack.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # Operations ----------------------------------------------------------------------

    @rule(first=sectors, count=lengths, fill=st.binary(min_size=1, max_size=1))
    def write(self, first: int, count: int, fill: bytes) -> None:
        assert self.stack is not None
        offset, length = clamp(first, count)

        # A pattern that differs per sector, so misplaced sectors show.
        data = b"".join(
            bytes([fill[0], (first + i) & 0xFF]) * (SECTOR // 2) for i in range(length // SECTOR)
        )
        self.stack.pwrite(offset, data)
        self.model[offset : offset + length] = data

    @rule(first=sectors, count=lengths)
    def trim(self, first: int, count: int) -> None:
        assert self.stack is not None
        offset, length = clamp(first, count)
        self.stack.trim(offset, length)
        self.model[offset : offset + length] = bytes(length)

    @precondition(lambda self: len(self.lower_paths) < MAX_LOWERS)
    @rule(compress=st.sampled_from([None, None, "lz4", "zstd"]))
    def commit(self, compress: str | None) -> None:
        self.push_upper(compress)

    @rule()
    def reopen(self) -> None:
        assert self.stack is not None and self.stack.upper is not None
        upper = self.stack.upper
        upper.flush()
        data, index = Path(upper.data_path), Path(upper.index_path)
        self.stack.close()
        self.open_stack(WritableLayer.open(data, index))

    @rule(first=sectors, count=lengths)
    def read(self, first: int, count: int) -> None:
        assert self.stack is not None
        offset, length = clamp(first, count)
        assert self.stack.pread(offset, length) == bytes(self.model[offset : offset + length])

    @invariant()
    def whole_disk_matches(self) -> None:
        if self.stack is not None:
            assert self.stack.size == DISK
            assert self.stack.pread(0, DISK) == bytes(self.model)


ImageMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_image_matches_a_bytearray = ImageMachine.TestCase
