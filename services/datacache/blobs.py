"""Encrypted objects on disk: `objects/<blob id>`, written once, read by range.

A blob id is random, not derived from the content, so the names on disk say nothing
about the data. Writes go to `tmp/` and are renamed into place when complete; a crash
leaves only a tmp file, removed at the next start. Crypto and file I/O run in worker
threads, a few MiB per hop, so the event loop keeps serving while a GiB streams through.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from services.datacache.crypto import (
    HEADER_BYTES_MAX,
    TAG,
    IntegrityError,
    KeyProvider,
    Opener,
    Sealer,
)

#: Segments sealed or opened per thread hop.
BATCH = 4


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
        """Encrypt a stream into a new blob; its plaintext SHA-256 and size come back."""
        blob_id = uuid.uuid4().hex
        tmp = self.tmp / blob_id
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        sealed = _SealedFile(os.fdopen(fd, "wb"), Sealer(self.keys, self.segment_size))
        size = 0
        try:
            pending: list[bytes] = []
            held = 0
            batch = self.segment_size * BATCH
            streamed = False
            async for chunk in chunks:
                pending.append(chunk)
                held += len(chunk)
                size += len(chunk)
                # Keep at least one byte back: only the end of the stream knows the last.
                if held > batch:
                    data = b"".join(pending)
                    whole = (held - 1) // self.segment_size * self.segment_size
                    pending, held = [data[whole:]], held - whole
                    await sealed.add(memoryview(data)[:whole], final=False)
                    streamed = True
            rest = memoryview(b"".join(pending))
            if streamed:
                await sealed.add(rest, final=True)
                await sealed.finish()
                await asyncio.to_thread(os.rename, tmp, self.path(blob_id))
            else:  # a small file, whole in memory: one trip to a worker thread, not four
                await asyncio.to_thread(sealed.store_whole, rest, tmp, self.path(blob_id))
        except BaseException:
            await sealed.close()
            tmp.unlink(missing_ok=True)
            await _close(chunks)  # a source's stream ends now, not whenever it is collected
            raise
        stored = len(sealed.sealer.header) + size + TAG * max(1, -(-size // self.segment_size))
        return StoredBlob(blob_id, size, sealed.digest.hexdigest(), stored)

    # -- reading ------------------------------------------------------------------------

    def _opener(self, path: Path) -> tuple[Opener, int]:
        with path.open("rb") as f:
            head = f.read(HEADER_BYTES_MAX)
        opener = Opener.read_header(head, self.keys)
        return opener, opener.plaintext_size(path.stat().st_size)

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
        last = max(0, -(-size // seg) - 1)
        first_index, last_index = start // seg, max(start, end - 1) // seg
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)

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
        plain = []
        for k in range(count):
            piece = raw[k * full : (k + 1) * full]
            is_last = index + k == last
            if (len(piece) < full and not is_last) or len(piece) < TAG:
                raise IntegrityError(f"truncated at segment {index + k}")
            plain.append(opener.open(index + k, piece, is_last))
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

    async def delete(self, blob_id: str) -> None:
        await asyncio.to_thread(self.path(blob_id).unlink, True)

    async def quarantine(self, blob_id: str) -> Path:
        """Move a blob that failed its check aside, for the operator to examine."""
        target = self.quarantined / f"{blob_id}.{int(time.time())}"
        await asyncio.to_thread(shutil.move, self.path(blob_id), target)
        return target

    def stored_bytes(self) -> int:
        return sum(entry.stat().st_size for entry in os.scandir(self.objects) if entry.is_file())


class _SealedFile:
    """One blob being written, as a three-stage pipeline: while the next batch arrives
    from the source, the previous one is hashed and sealed in a worker thread, and the one
    before that written by another. Two locks, taken in arrival order (asyncio's locks
    are fair), keep the segments in order; at most `IN_FLIGHT` batches wait, so memory
    stays bounded whatever the source's speed.

    No fsync: a blob torn by a power cut fails its authentication when read, is
    quarantined, and its source is fetched again.
    """

    IN_FLIGHT = 2

    def __init__(self, out: BinaryIO, sealer: Sealer) -> None:
        self.out = out
        self.sealer = sealer
        self.digest = hashlib.sha256()
        self._sealing = asyncio.Lock()
        self._writing = asyncio.Lock()
        self._steps: deque[asyncio.Future[None]] = deque()
        out.write(sealer.header)

    async def add(self, data: memoryview, final: bool) -> None:
        while len(self._steps) >= self.IN_FLIGHT:
            await self._steps.popleft()
        self._steps.append(asyncio.ensure_future(self._step(data, final)))

    async def _step(self, data: memoryview, final: bool) -> None:
        async with self._sealing:
            segments = await asyncio.to_thread(self._seal, data, final)
        async with self._writing:
            await asyncio.to_thread(self._write, segments)

    def _seal(self, data: memoryview, final: bool) -> list[bytes]:
        """`data` as whole segments (and, when `final`, the last one, perhaps empty)."""
        self.digest.update(data)
        step = self.sealer.segment_size
        starts = list(range(0, len(data), step)) or [0]
        return [
            self.sealer.seal(data[at : at + step], last=final and at == starts[-1]) for at in starts
        ]

    def _write(self, segments: list[bytes]) -> None:
        """All segments in as few system calls as the kernel allows, without joining them."""
        self.out.flush()
        fd, pending = self.out.fileno(), segments
        while pending:
            written = os.writev(fd, pending)
            while pending and written >= len(pending[0]):
                written -= len(pending[0])
                pending = pending[1:]
            if written:
                pending = [pending[0][written:], *pending[1:]]

    def store_whole(self, data: memoryview, tmp: Path, target: Path) -> None:
        """Seal, write, close and move into place a blob that arrived whole (blocking)."""
        self._write(self._seal(data, final=True))
        self.out.close()
        os.rename(tmp, target)

    async def finish(self) -> None:
        """Wait for the last write (raising what any step raised) and close."""
        while self._steps:
            await self._steps.popleft()
        await asyncio.to_thread(self.out.close)

    async def close(self) -> None:
        """Close after a failure, once no thread uses the file any more."""
        await asyncio.gather(*self._steps, return_exceptions=True)
        self._steps.clear()
        self.out.close()


async def _close(chunks: AsyncIterable[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
