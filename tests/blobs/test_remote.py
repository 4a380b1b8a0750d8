"""The trio portal and the synchronous file over an asynchronous reader."""

from __future__ import annotations

import threading

import pytest
import trio

from workbench.blobs.remote import RemoteBlobFile, TrioPortal, WouldBlockError, nonblocking

BLOB = bytes(range(256)) * 64


async def read_blob(offset: int, length: int) -> bytes:
    await trio.sleep(0.001)  # a real await, so reads interleave in the loop
    return BLOB[offset : offset + length]


def test_reads_run_in_the_loop_and_clip_at_the_end() -> None:
    with TrioPortal() as portal:
        blob = RemoteBlobFile("blob", len(BLOB), read_blob, portal)

        assert blob.pread(10, 5) == BLOB[10:15]
        assert blob.pread(len(BLOB) - 3, 100) == BLOB[-3:]
        assert blob.pread(len(BLOB), 10) == b""
        assert blob.pread(0, 0) == b""


def test_many_threads_wait_on_one_loop_concurrently() -> None:
    in_flight = 0
    most = 0

    async def slow_read(offset: int, length: int) -> bytes:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await trio.sleep(0.05)
        in_flight -= 1
        return BLOB[offset : offset + length]

    results: dict[int, bytes] = {}
    with TrioPortal() as portal:
        blob = RemoteBlobFile("blob", len(BLOB), slow_read, portal)

        def reader(i: int) -> None:
            results[i] = blob.pread(i * 100, 100)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert all(results[i] == BLOB[i * 100 : i * 100 + 100] for i in range(8))
    assert most > 1


def test_errors_of_the_reader_reach_the_caller() -> None:
    async def failing(offset: int, length: int) -> bytes:
        raise FileNotFoundError("blob sha256:abc is gone")

    with TrioPortal() as portal:
        blob = RemoteBlobFile("blob", 100, failing, portal)
        with pytest.raises(FileNotFoundError, match="sha256:abc is gone"):
            blob.pread(0, 10)


def test_background_tasks_are_cancelled_on_close() -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    portal = TrioPortal().start()
    portal.start_soon(forever)
    portal.close()

    assert cancelled.is_set()
    with pytest.raises(RuntimeError, match="not running"):
        portal.run(read_blob, 0, 1)


def test_close_callback_runs_once() -> None:
    closed = []
    with TrioPortal() as portal:
        blob = RemoteBlobFile("blob", 10, read_blob, portal, on_close=lambda: closed.append(1))
        blob.close()
        blob.close()
    assert closed == [1]


def test_inside_nonblocking_a_read_that_would_wait_fails_before_reading() -> None:
    calls = []

    async def recorded(offset: int, length: int) -> bytes:
        calls.append(offset)
        return BLOB[offset : offset + length]

    with TrioPortal() as portal:
        blob = RemoteBlobFile("blob", len(BLOB), recorded, portal)

        with nonblocking(), pytest.raises(WouldBlockError, match=r"blob: \[10, \+5\) is not"):
            blob.pread(10, 5)
        assert calls == []
        assert blob.pread(10, 5) == BLOB[10:15]  # outside the block it waits again
        assert calls == [10]
