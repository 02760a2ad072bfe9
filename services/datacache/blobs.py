"""Encrypted objects on disk: `objects/<blob id>`, written once, read by range.

A blob id is random, not derived from the content, so the names on disk say nothing
about the data. Writes go to `tmp/` and are renamed into place when complete; a deleted
blob is renamed back there to be unlinked. So a crash leaves only files in `tmp/`,
removed at the next start. Crypto and file I/O run in worker threads (a blob is written
by a thread of its own, read a few MiB per hop), so the event loop keeps serving while
a GiB streams through.

One module because writing, reading and quarantining share one on-disk format: the
`objects/`, `tmp/` and `quarantine/` directories and a blob's header followed by sealed
segments, which `_SealedFile` writes and `read`, `sealed` and `SealedBlob.plaintext_in`
take apart; a change to one side must be made on the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import itertools
import mmap
import os
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
)
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

import structlog

from services.datacache.crypto import KeyProvider, Sealer, data_key
from shared.download import ReadsInto
from shared.pipeline import Lane
from shared.sealed import HEADER_BYTES_MAX, TAG, Header, IntegrityError, Opener
from shared.threadio import acquired, interruptible

log = structlog.get_logger("medhive.datacache.blobs")

#: Direct writes go in whole blocks of this many bytes, from memory aligned to it: the
#: logical block of the disks in use (512 or 4096 bytes) divides it, and a header
#: (`HEADER_BYTES_MAX`) fits in one.
BLOCK = 4096
#: Segments opened per thread hop when serving decrypted.
BATCH = 8
#: Segments sealed per thread hop when writing: a batch and its ciphertext stay within
#: a core's 4 MiB L2 cache while they are hashed, sealed and written (at 8, hashing
#: alone took a third longer).
SEAL_BATCH = 4


#: A blob's bytes as batches, each with whether it is the last.
_Batched = AsyncGenerator[tuple["_Batch", bool], None]
#: Blobs written at once (`write`, `write_from`), a thread each; more wait for one.
RECEIVERS = 16
#: How often a reader's writing tells its caller of the bytes it has stored.
COUNT_EVERY_S = 0.2


@runtime_checkable
class Readable(ReadsInto, Protocol):
    """A source that reads into memory it is given (blocking, from one worker thread at
    a time), such as an HTTP download (`shared.download`): what `write_from` stores."""

    def abort(self) -> None:
        """Make a read under way return now (called from another thread)."""
        ...


@dataclass(frozen=True)
class SealedBlob:
    """A blob as stored, for a reader that opens it itself."""

    path: Path
    stored_size: int
    size: int
    header_size: int
    segment_size: int
    data_key: bytes

    def plaintext_in(self, sent: int) -> int:
        """Plaintext bytes of the whole segments among the first `sent` stored bytes."""
        if sent >= self.stored_size:
            return self.size
        whole = max(0, sent - self.header_size) // (self.segment_size + TAG)
        return min(self.size, whole * self.segment_size)


@dataclass(frozen=True)
class StoredBlob:
    blob_id: str
    size: int
    sha256: str
    stored_size: int


class BlobStore:
    def __init__(self, root: Path, keys: KeyProvider, segment_size: int = 1 << 20) -> None:
        self.root = root
        self.keys = keys
        self.segment_size = segment_size
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.quarantined = root / "quarantine"
        for path in (root, self.objects, self.tmp, self.quarantined):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        self._batches = _Batches(segment_size)
        self._receiving = ThreadPoolExecutor(RECEIVERS, thread_name_prefix="blob-receive")
        self._sealing = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="blob-seal")
        #: Unlinks the files of deleted blobs, one after the other (`delete`).
        self._unlinking = ThreadPoolExecutor(1, thread_name_prefix="blob-unlink")
        self._unlinked: Future[None] = Future()
        self._unlinked.set_result(None)

    def path(self, blob_id: str) -> Path:
        if not blob_id.isalnum():
            raise ValueError(f"bad blob id {blob_id!r}")
        return self.objects / blob_id

    def cleanup_tmp(self) -> None:
        """Remove what writes interrupted by a crash left."""
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)

    # -- writing ------------------------------------------------------------------------

    async def write(self, chunks: AsyncIterable[bytes]) -> StoredBlob:
        """Encrypt a stream into a new blob; its plaintext SHA-256 and size come back.

        The stream is copied, as it arrives, into batch buffers that the blob store
        reuses (`_Batch`). A file that fits in one segment is then stored in one trip to
        a worker thread (`write_whole`); a longer one is written by a thread that takes
        each batch as it fills (`_written`)."""
        batches = self._copied(chunks)
        async with contextlib.aclosing(batches):
            batch, final = first = await anext(batches)
            if self._whole(batch, final):
                try:
                    return await asyncio.to_thread(self.write_whole, batch.data)
                finally:
                    self._batches.give_back(batch)
            pulled = _Pulled(batches, asyncio.get_running_loop())
            writing = functools.partial(self._written, itertools.chain([first], pulled))
            try:
                return await interruptible(writing, pulled.stop, self._receiving)
            finally:
                await pulled.settled()  # before the stream is closed

    async def write_from(
        self, source: Readable, counted: Callable[[int], Awaitable[None]] | None = None
    ) -> StoredBlob:
        """Encrypt what `source` reads into a new blob, as `write` does a stream;
        `counted` learns, every `COUNT_EVERY_S` and at the end, of the bytes read since
        it last heard, which are then on their way to the disk.

        One thread of the blob store's own (`_receiving`: a read waits on the network
        for as long as the source takes, and would hold a thread that sealing and
        serving need) reads the source straight into the batch buffers and hands each
        batch to the sealing pipeline itself (`_written`). Each batch handed over through
        the event loop instead cost about 0.8 ms of CPU (futures, callbacks, thread
        wake-ups), and staging a GiB took 1.27 s against 1.12 s this way (in-process,
        the bench's origin, alternating, medians of 7)."""
        stopping = threading.Event()
        handed = _Handed()

        def stop() -> None:
            stopping.set()
            source.abort()

        writing = functools.partial(self._written, self._read(source, stopping), handed)
        return await _counted(
            asyncio.ensure_future(interruptible(writing, stop, self._receiving)), handed, counted
        )

    async def _copied(self, chunks: AsyncIterable[bytes]) -> _Batched:
        """The stream's bytes in batches."""
        try:
            batch = self._batches.take()
            async for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    if batch.full:  # and more follows: not the last batch
                        yield batch, False
                        batch = self._batches.take()
                    view = view[batch.fill(view) :]
            yield batch, True
        finally:
            await _close(chunks)  # a source's stream ends now, not whenever it is collected

    def _read(self, source: Readable, stopping: threading.Event) -> Iterator[tuple[_Batch, bool]]:
        """What `source` reads, in batches (blocking), until `stopping` is set. A batch
        is known not to be the last once a byte after it has been read (which then
        opens the next batch)."""
        ahead = b""
        while not stopping.is_set():
            batch = self._batches.take()
            ahead = _received(source, batch, ahead)
            yield batch, not ahead
            if not ahead:
                return
        raise InterruptedError("the write was stopped")

    def _whole(self, batch: _Batch, final: bool) -> bool:
        """Whether a file whose first batch this is fits in one segment: stored in one
        go (`write_whole`), not through the pipeline."""
        return final and batch.filled <= self.segment_size

    def _written(
        self, batches: Iterator[tuple[_Batch, bool]], handed: _Handed | None = None
    ) -> StoredBlob:
        """A new blob of the batches' bytes (blocking: one thread takes each batch as it
        comes and hands it to the sealing pipeline, `_SealedFile`, which it waits for
        while `IN_FLIGHT` batches are in it), written to `tmp/` and moved into place.
        `handed` counts the bytes handed over."""
        blob_id = uuid.uuid4().hex
        tmp = self.tmp / blob_id
        sealed: _SealedFile | None = None
        size = 0
        try:
            for batch, final in batches:
                size += batch.filled
                if handed is not None:
                    handed.bytes += batch.filled
                if sealed is None and self._whole(batch, final):
                    try:
                        return self.write_whole(batch.data)
                    finally:
                        self._batches.give_back(batch)
                if sealed is None:
                    sealed = self._create(tmp, direct=True)
                sealed.add(batch, final)
                if final:
                    break
            assert sealed is not None, "the batches end with a final one"
            sealed.finish()
            os.rename(tmp, self.path(blob_id))
        except BaseException:
            if sealed is not None:
                sealed.close()
            tmp.unlink(missing_ok=True)
            raise
        return StoredBlob(blob_id, size, sealed.digest.hexdigest(), sealed.stored_size(size))

    def write_whole(self, data: bytes | memoryview) -> StoredBlob:
        """Encrypt a file that is whole in memory into a new blob (blocking: for a worker
        thread; creating, sealing, writing and renaming in one trip costs a small file
        less than handing each step to a thread of its own)."""
        blob_id = uuid.uuid4().hex
        tmp = self.tmp / blob_id
        sealed = self._create(tmp)
        try:
            sealed.store_whole(memoryview(data), tmp, self.path(blob_id))
        except BaseException:
            sealed.out.close()
            tmp.unlink(missing_ok=True)
            raise
        size = len(data)
        return StoredBlob(blob_id, size, sealed.digest.hexdigest(), sealed.stored_size(size))

    def _create(self, tmp: Path, direct: bool = False) -> _SealedFile:
        """A new blob file at `tmp`; `direct`: written around the page cache, where the
        filesystem allows it (see `_SealedFile`)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            tmp.unlink(missing_ok=True)  # created before the flag was refused
            fd = os.open(tmp, flags, 0o600)
        out = os.fdopen(fd, "wb", buffering=0)
        return _SealedFile(out, Sealer(self.keys, self.segment_size), self._batches, self._sealing)

    # -- reading ------------------------------------------------------------------------

    @staticmethod
    def _open(path: Path) -> BinaryIO:
        """The blob's file, open for reading (blocking). A blob whose file is gone is as
        damaged as one whose bytes are wrong."""
        try:
            return path.open("rb")
        except FileNotFoundError:
            raise IntegrityError("the object's file is missing") from None

    def _header(self, file: BinaryIO) -> tuple[Header, bytes, int]:
        """The header of the blob open in `file`, its data key and its stored size."""
        head = os.pread(file.fileno(), HEADER_BYTES_MAX, 0)
        header = Header.parse(head)
        return header, data_key(header, self.keys), os.fstat(file.fileno()).st_size

    def _opener(self, path: Path) -> tuple[Opener, int]:
        with self._open(path) as file:
            header, key, stored = self._header(file)
        found = Opener.with_key(header, key)
        return found, found.plaintext_size(stored)

    def sealed(self, blob_id: str) -> SealedBlob:
        """What a node needs to open the blob itself: where it is, how long, its data
        key (blocking: reads the header)."""
        sealed, file = self.open_sealed(blob_id)
        file.close()
        return sealed

    def open_sealed(self, blob_id: str) -> tuple[SealedBlob, BinaryIO]:
        """`sealed`, and the blob's file open for reading (blocking): the bytes sent are
        those of the file the header was read from, and serving an object takes one
        trip to a worker thread, not two."""
        path = self.path(blob_id)
        file = self._open(path)
        try:
            header, key, stored = self._header(file)
            size = Opener.with_key(header, key).plaintext_size(stored)
        except BaseException:
            file.close()
            raise
        return SealedBlob(path, stored, size, len(header.raw), header.segment_size, key), file

    def size(self, blob_id: str) -> int:
        """Plaintext size, from the header and the file's length (no decryption)."""
        return self._opener(self.path(blob_id))[1]

    def stored_size(self, blob_id: str) -> int:
        return self.path(blob_id).stat().st_size

    def exists(self, blob_id: str) -> bool:
        return self.path(blob_id).is_file()

    async def read(
        self, blob_id: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """Verified plaintext of [start, end), segment by segment; `IntegrityError` at the
        first segment that fails (everything yielded before it was authentic)."""
        path = self.path(blob_id)
        opener, size = await asyncio.to_thread(self._opener, path)
        end = size if end is None else min(end, size)
        if start >= end and size:
            return
        seg = opener.segment_size
        last = max(0, -(-size // seg) - 1)  # the final segment, perhaps empty
        first_index, last_index = start // seg, max(start, end - 1) // seg
        fd = await acquired(lambda: os.open(path, os.O_RDONLY), os.close)

        def batch(index: int) -> asyncio.Future[list[bytes]] | None:
            if index > last_index:
                return None
            return asyncio.ensure_future(
                asyncio.to_thread(self._open_batch, fd, opener, index, last_index, last)
            )

        index, ahead = first_index, batch(first_index)
        try:
            while ahead is not None:
                plain = await ahead
                following = index + len(plain)
                ahead = batch(following)  # decrypts while this batch is sent
                for i, data in enumerate(plain, start=index):
                    lo = start - i * seg if i == first_index else 0
                    hi = end - i * seg if i == last_index else len(data)
                    if lo < hi:
                        yield data[lo:hi]
                index = following
        finally:
            if ahead is not None:
                ahead.cancel()
                await asyncio.gather(ahead, return_exceptions=True)
            os.close(fd)

    @staticmethod
    def _open_batch(fd: int, opener: Opener, index: int, last_index: int, last: int) -> list[bytes]:
        count = min(BATCH, last_index - index + 1)
        offset, full = opener.segment_span(index)
        raw = os.pread(fd, full * count, offset)
        plain = opener.open_run(raw, index, count, last)
        if index + count - 1 == last and os.fstat(fd).st_size > offset + len(raw):
            raise IntegrityError("trailing data after the last segment")
        return plain

    async def verify(self, blob_id: str) -> str:
        """Read the whole blob; the SHA-256 of its plaintext."""
        digest = hashlib.sha256()
        async for chunk in self.read(blob_id):
            digest.update(chunk)
        return digest.hexdigest()

    # -- removal ------------------------------------------------------------------------

    async def delete(self, *blob_ids: str) -> None:
        """Remove blobs (those already gone count as removed), all in one trip to a
        worker thread: a study staged again for another tenant repeats a thousand.

        Each leaves `objects/` at once, renamed into `tmp/` (whose files are no blobs
        and go at the next start, `cleanup_tmp`), and a thread of its own unlinks it
        afterwards (`emptied`): freeing a GiB's extents takes the filesystem 0.18 s
        here, which a staging that found its content stored already (its fresh copy
        goes) or an eviction need not wait for."""

        def move_out() -> list[Path]:
            moved = []
            for blob_id in blob_ids:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path(blob_id), self.tmp / blob_id)
                    moved.append(self.tmp / blob_id)
            return moved

        if moved := await asyncio.to_thread(move_out):
            self._unlinked = self._unlinking.submit(_unlink_all, moved)

    async def emptied(self) -> None:
        """Wait until the files of the blobs deleted so far are unlinked."""
        await asyncio.wrap_future(self._unlinked)

    async def quarantine(self, blob_id: str) -> None:
        """Move a blob that failed its check aside, for the operator to examine (if its
        file is there at all)."""
        target = self.quarantined / f"{blob_id}.{int(time.time())}"
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(shutil.move, self.path(blob_id), target)

    def stored_bytes(self) -> int:
        """What the objects take on disk; a file removed meanwhile counts nothing."""
        total = 0
        with os.scandir(self.objects) as entries:  # closed even when a stat fails
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size if entry.is_file() else 0
        return total


def _unlink_all(paths: list[Path]) -> None:
    """Unlink files that are no blobs any more (blocking); one that fails is left to
    the next start."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("unlink_failed", path=str(path), error=str(exc))


class _Batch:
    """Room for one batch of segments: the plaintext as it arrives, and its sealed form.

    A batch's buffers are used again for a later batch (see `_Batches`), so a GiB
    streams through the same few MiB: a fresh buffer (each batch joined anew, each
    segment sealed into new bytes, as before) is faulted in by the kernel 4 KiB at a
    time when first touched. The sealed form is written straight to the disk from
    where it lies (`_SealedFile`), so it is page-aligned memory with a block to spare
    at each end: before it, the previous batch's unwritten tail; after it, the last
    block's padding."""

    def __init__(self, segment_size: int) -> None:
        self.plain = bytearray(segment_size * SEAL_BATCH)
        self.sealed = mmap.mmap(-1, (segment_size + TAG) * SEAL_BATCH + 2 * BLOCK)
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled == len(self.plain)

    def fill(self, data: memoryview) -> int:
        """Copy as much of `data` as fits; how much that was."""
        taken = min(len(data), len(self.plain) - self.filled)
        self.plain[self.filled : self.filled + taken] = data[:taken]
        self.filled += taken
        return taken

    @property
    def data(self) -> memoryview:
        return memoryview(self.plain)[: self.filled]


def _received(source: Readable, batch: _Batch, ahead: bytes) -> bytes:
    """Fill `batch` from `source`, after the bytes read `ahead` of it (blocking); the
    first byte after the batch, or nothing when the source ended within it."""
    batch.fill(memoryview(ahead))
    while not batch.full:
        got = source.readinto(memoryview(batch.plain)[batch.filled :])
        if not got:
            return b""
        batch.filled += got
    following = bytearray(1)
    return bytes(following) if source.readinto(memoryview(following)) else b""


class _Batches:
    """The batch buffers not in use, for the next write to take. Writes that run at
    once take more; at most `SPARE` are kept when they come back."""

    SPARE = 8

    def __init__(self, segment_size: int) -> None:
        self.segment_size = segment_size
        self._free: list[_Batch] = []
        self._lock = threading.Lock()  # writing threads take, lanes give back

    def take(self) -> _Batch:
        with self._lock:
            batch = self._free.pop() if self._free else None
        batch = batch or _Batch(self.segment_size)
        batch.filled = 0
        return batch

    def give_back(self, batch: _Batch) -> None:
        with self._lock:
            if len(self._free) < self.SPARE:
                self._free.append(batch)


@dataclass
class _Handed:
    """Bytes a writing thread has handed to the sealing pipeline so far (that thread
    alone adds to it)."""

    bytes: int = 0


class _Pulled:
    """A stream's batches, made on the event loop, for the writing thread to take one at
    a time (each a trip to the loop); `stop` ends the one being waited for."""

    def __init__(self, batches: _Batched, loop: asyncio.AbstractEventLoop) -> None:
        self._batches, self._loop = batches, loop
        self._lock = threading.Lock()
        self._stopped = False
        self._pull: Future[tuple[_Batch, bool]] | None = None
        #: The loop's task of the last pull that began.
        self._pulling: asyncio.Task[object] | None = None

    def __iter__(self) -> Iterator[tuple[_Batch, bool]]:
        return self

    def __next__(self) -> tuple[_Batch, bool]:
        with self._lock:
            if self._stopped:
                raise InterruptedError("the write was stopped")
            self._pull = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
        return self._pull.result()

    async def _next(self) -> tuple[_Batch, bool]:
        self._pulling = asyncio.current_task()
        return await anext(self._batches)

    async def settled(self) -> None:
        """Wait until no pull runs the stream any more (one that `stop` cancelled may
        still be ending on the loop)."""
        if self._pulling is not None:
            await asyncio.wait([self._pulling])

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._pull is not None:
                self._pull.cancel()


async def _counted(
    writing: asyncio.Future[StoredBlob],
    handed: _Handed,
    counted: Callable[[int], Awaitable[None]] | None,
) -> StoredBlob:
    """What `writing` stores; meanwhile `counted` learns every `COUNT_EVERY_S`, and at
    the end, of the bytes handed to the pipeline since it last heard. A failure of
    `counted` stops the writing."""
    told = 0

    async def tell() -> None:
        nonlocal told
        if counted is not None and (now := handed.bytes) > told:
            await counted(now - told)
            told = now

    try:
        while not (await asyncio.wait([writing], timeout=COUNT_EVERY_S))[0]:
            await tell()
        blob = writing.result()
        await tell()
        return blob
    except BaseException:
        writing.cancel()
        await asyncio.wait([writing])
        raise


class _SealedFile:
    """One blob being written, as a pipeline over batches of whole segments, fed by the
    thread that writes the blob (blocking): while that thread takes the next batch
    from the source, the previous ones are hashed, sealed and written, each in a
    thread of its own (SHA-256 and AES-GCM release the GIL, and a write waits for the
    disk). Sealing needs no order: batches are sealed by the blob store's sealing
    threads, on any core, a batch while the one before is still being written. Hashing
    and writing take the batches in order, each in a lane of the blob's own
    (`shared.pipeline.Lane`, a thread), where the write of a batch waits for its
    sealing. At most `IN_FLIGHT` batches are in the pipeline, so memory stays bounded
    whatever the source's speed; a batch's buffers go back to the blob store once it
    is hashed and written.

    The file is written around the page cache (`O_DIRECT`), in whole blocks, from the
    batch's own page-aligned buffer. Copying into the page cache was a quarter of
    staging's CPU (measured on this machine: `copy_folio_from_iter_atomic`, 25% of the
    datacache's samples while staging; the kernel's later writeback came on top), and
    an object is read by a node later, once per job, so caching it as it is written
    buys little and pushes out what is read now. A batch's sealed bytes rarely end on
    a block: the bytes after its last whole block (`_carry`) are written in front of
    the next batch's, in the next batch's buffer, and the final block is padded and
    the file cut to its length. On a filesystem without direct I/O, or a disk with
    larger blocks than `BLOCK`, the same writes go through the page cache.

    No fsync: a blob torn by a power cut fails its authentication when read, is
    quarantined, and its source is fetched again.
    """

    IN_FLIGHT = 3

    def __init__(self, out: BinaryIO, sealer: Sealer, batches: _Batches, sealing: Executor) -> None:
        self.out = out
        self.sealer = sealer
        self.batches = batches
        self.digest = hashlib.sha256()
        self._segments = 0
        self._sealing = sealing
        self._hashing, self._writing = Lane("blob-hash"), Lane("blob-write")
        #: Each batch in the pipeline: done once it is hashed and written.
        self._steps: deque[Future[None]] = deque()
        #: The bytes from the last block boundary to where the next batch starts: the
        #: header at first (shorter than a block), then the previous batch's tail.
        self._carry = bytes(sealer.header)

    def add(self, batch: _Batch, final: bool) -> None:
        """Hand `batch` to the pipeline (blocking: waits while `IN_FLIGHT` are in it;
        raises what a step before raised)."""
        while len(self._steps) >= self.IN_FLIGHT:
            self._steps.popleft().result()
        data = batch.data
        first, self._segments = self._segments, self._segments + _segments_in(data, self.sealer)
        start = len(self.sealer.header) + first * (self.sealer.segment_size + TAG)
        # Sealed where its bytes will be written from: behind the carried ones.
        into = memoryview(batch.sealed)[start % BLOCK :]
        sealed = self._sealing.submit(self._seal_into, data, first, final, into)
        hashed = self._hashing.run(lambda: self.digest.update(data))

        def written() -> None:
            # In the write lane, after the batch's sealing; then, once it is hashed
            # too, no thread reads the batch any more.
            self._write(batch, start, sealed.result(), final)
            hashed.result()
            self.batches.give_back(batch)

        self._steps.append(self._writing.run(written))

    def _write(self, batch: _Batch, start: int, sealed: int, final: bool) -> None:
        """Write the whole blocks of `batch`, whose `sealed` bytes go at `start` in the
        file, with the carried bytes in front (when `final`, all of it, the last block
        padded, and the file cut to its length); keep what follows the last whole block
        for the next batch."""
        buffer, carried = memoryview(batch.sealed), len(self._carry)
        buffer[:carried] = self._carry
        end = carried + sealed
        if final:
            whole = -(-end // BLOCK) * BLOCK
            buffer[end:whole] = bytes(whole - end)
        else:
            whole = end // BLOCK * BLOCK
            self._carry = bytes(buffer[whole:end])
        self._pwrite(buffer[:whole], start - carried)
        if final:
            os.ftruncate(self.out.fileno(), start + sealed)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        """Write all of `view` at `offset`. A disk whose blocks are larger than `BLOCK`
        refuses a direct write (`EINVAL`): the file then goes on through the page cache."""
        fd = self.out.fileno()
        while view:
            try:
                done = os.pwrite(fd, view, offset)
            except OSError as exc:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                if exc.errno != errno.EINVAL or not flags & os.O_DIRECT:
                    raise
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                continue
            view, offset = view[done:], offset + done

    def _seal_into(self, data: memoryview, first: int, final: bool, out: memoryview) -> int:
        """Seal `data` as whole segments from segment `first` (and, when `final`, the
        last one, perhaps empty) into `out`, one after the other; the bytes sealed."""
        step, full = self.sealer.segment_size, self.sealer.segment_size + TAG
        starts = list(range(0, len(data), step)) or [0]
        for k, at in enumerate(starts):
            size = min(step, len(data) - at)
            last = final and at == starts[-1]
            self.sealer.seal_into(
                first + k, data[at : at + size], last, out[k * full :][: size + TAG]
            )
        return len(data) + TAG * len(starts)

    def stored_size(self, size: int) -> int:
        """Bytes on disk of a blob of `size` plaintext bytes."""
        segments = max(1, -(-size // self.sealer.segment_size))
        return len(self.sealer.header) + size + TAG * segments

    def store_whole(self, data: memoryview, tmp: Path, target: Path) -> None:
        """Hash, seal, write, close and move into place a blob that arrived whole
        (blocking: a small file costs less in one thread than handed between three)."""
        self.digest.update(data)
        header = self.sealer.header
        out = bytearray(len(header) + len(data) + TAG * _segments_in(data, self.sealer))
        out[: len(header)] = header
        self._seal_into(data, 0, True, memoryview(out)[len(header) :])
        self._pwrite(memoryview(out), 0)
        self.out.close()
        os.rename(tmp, target)

    def finish(self) -> None:
        """Wait for the last write (raising what any step raised) and close (blocking)."""
        while self._steps:
            self._steps.popleft().result()
        self.close()

    def close(self) -> None:
        """End the lanes (a step not started is dropped, one under way finishes) and
        close the file (blocking): afterwards no thread uses the file."""
        self._hashing.stop()
        self._writing.stop()
        self.out.close()


def _segments_in(data: memoryview, sealer: Sealer) -> int:
    return max(1, -(-len(data) // sealer.segment_size))


async def _close(chunks: AsyncIterable[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
