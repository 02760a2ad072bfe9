"""A source that reads into the blob store's own buffers (`BlobStore.write_from`) stores
the blob a stream of chunks stores, whatever its size against the batches; and a write
that is cancelled stops the read under way instead of waiting for it; a long read is
counted as it goes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.datacache.blobs import SEAL_BATCH, BlobStore
from services.datacache.crypto import LocalKeyProvider

KEYS = LocalKeyProvider({"k1": bytes(range(32))})
SEGMENT = 1000
BATCH = SEGMENT * SEAL_BATCH


class Reads:
    """An in-memory source whose reads return at most `step` bytes each."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.at = memoryview(data), step, 0

    def readinto(self, view: memoryview) -> int:
        got = min(len(view), self.step, len(self.data) - self.at)
        view[:got] = self.data[self.at : self.at + got]
        self.at += got
        return got

    def abort(self) -> None:
        raise AssertionError("nothing to abort")


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for at in range(0, len(data), 777):
        yield data[at : at + 777]


@pytest.mark.parametrize(
    "size",
    [0, 1, SEGMENT, SEGMENT + 1, BATCH - 1, BATCH, BATCH + 1, 3 * BATCH, 3 * BATCH + 7],
)
@pytest.mark.parametrize("step", [333, 1 << 16])
async def test_the_same_blob_as_from_chunks(tmp_path: Path, size: int, step: int) -> None:
    data = os.urandom(size)
    store = BlobStore(tmp_path, KEYS, segment_size=SEGMENT)
    counted: list[int] = []

    async def count(nbytes: int) -> None:
        counted.append(nbytes)

    read = await store.write_from(Reads(data, step), count)
    streamed = await store.write(_chunks(data))
    assert (read.size, read.sha256) == (size, hashlib.sha256(data).hexdigest())
    assert (read.size, read.sha256, read.stored_size) == (
        streamed.size, streamed.sha256, streamed.stored_size,
    )  # fmt: skip
    assert store.stored_size(read.blob_id) == read.stored_size
    assert b"".join([chunk async for chunk in store.read(read.blob_id)]) == data
    assert sum(counted) == size
    assert list(store.tmp.iterdir()) == []


class Stalled:
    """A source that sends nothing until it is aborted, as a stalled server does."""

    def __init__(self) -> None:
        self.reading, self.aborted = threading.Event(), threading.Event()

    def readinto(self, view: memoryview) -> int:
        self.reading.set()
        if not self.aborted.wait(timeout=600):
            raise AssertionError("never aborted")
        raise OSError("the connection was shut down")

    def abort(self) -> None:
        self.aborted.set()


@pytest.mark.parametrize("after", [0, 2 * BATCH])
async def test_a_cancelled_write_aborts_the_read_and_leaves_no_file(
    tmp_path: Path, after: int
) -> None:
    store = BlobStore(tmp_path, KEYS, segment_size=SEGMENT)
    stalled = Stalled()
    first = Reads(os.urandom(after), 1 << 16)

    class Source:
        def readinto(self, view: memoryview) -> int:
            return first.readinto(view) or stalled.readinto(view)

        def abort(self) -> None:
            stalled.abort()

    writing = asyncio.create_task(store.write_from(Source()))
    assert await asyncio.to_thread(stalled.reading.wait, 60)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(writing, 60)  # the guard against a hang, not a timing
    assert stalled.aborted.is_set()
    assert list(store.tmp.iterdir()) == [] and list(store.objects.iterdir()) == []


async def test_a_cancelled_stream_write_ends_its_stream_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    """The thread that writes a stream's blob waits on the event loop for each batch;
    a cancellation must end that wait, not leave the thread waiting for a source that
    sends nothing more."""
    store = BlobStore(tmp_path, KEYS, segment_size=SEGMENT)
    waiting, ended = asyncio.Event(), asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield os.urandom(2 * BATCH)
        waiting.set()
        try:  # a source that stops sending, until its wait is cancelled
            await asyncio.wait_for(asyncio.Event().wait(), 30)
        except asyncio.CancelledError:
            ended.set()
            raise

    writing = asyncio.create_task(store.write(stalls()))
    await asyncio.wait_for(waiting.wait(), 60)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(writing, 60)  # the guard against a hang, not a timing
    assert ended.is_set()
    assert list(store.tmp.iterdir()) == [] and list(store.objects.iterdir()) == []


async def test_a_long_read_is_counted_while_it_is_stored(tmp_path: Path) -> None:
    """Staging reports its progress from these counts: a large input is counted as it
    arrives, not only once it is whole."""
    store = BlobStore(tmp_path, KEYS, segment_size=SEGMENT)
    heard = threading.Event()
    data = os.urandom(8 * BATCH)
    head = Reads(data[: 2 * BATCH], 1 << 16)
    tail = Reads(data[2 * BATCH :], 1 << 16)

    class Source:
        def readinto(self, view: memoryview) -> int:
            if got := head.readinto(view):
                return got
            if not heard.wait(timeout=60):  # the rest comes once a count was heard
                raise AssertionError("nothing was counted while the read went on")
            return tail.readinto(view)

        def abort(self) -> None:
            heard.set()

    counted: list[int] = []

    async def count(nbytes: int) -> None:
        counted.append(nbytes)
        heard.set()

    blob = await store.write_from(Source(), count)
    assert 0 < counted[0] < len(data) and sum(counted) == len(data)
    assert blob.sha256 == hashlib.sha256(data).hexdigest()


async def test_a_count_that_fails_stops_the_write_and_leaves_no_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, KEYS, segment_size=SEGMENT)
    stalled = Stalled()
    first = Reads(os.urandom(2 * BATCH), 1 << 16)

    class Source:
        def readinto(self, view: memoryview) -> int:
            return first.readinto(view) or stalled.readinto(view)

        def abort(self) -> None:
            stalled.abort()

    async def count(nbytes: int) -> None:
        raise RuntimeError("the broker is away")

    with pytest.raises(RuntimeError, match="the broker is away"):
        await asyncio.wait_for(store.write_from(Source(), count), 60)
    assert stalled.aborted.is_set()
    assert list(store.tmp.iterdir()) == [] and list(store.objects.iterdir()) == []
