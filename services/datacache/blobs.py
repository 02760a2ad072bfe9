"""Encrypted objects on disk: `objects/<blob id>`, written once, read by range.

A blob id is random, not derived from the content, so the names on disk say nothing
about the data. Writes go to `tmp/` and are renamed into place after fsync; a crash
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
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from services.datacache.crypto import (
    HEADER_BYTES_MAX,
    TAG,
    IntegrityError,
    KeyProvider,
    Opener,
    Sealer,
)

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

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
        sealer = Sealer(self.keys, self.segment_size)
        digest = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        out = os.fdopen(fd, "wb")
        size = 0
        try:
            out.write(sealer.header)
            pending = bytearray()
            batch = self.segment_size * BATCH
            async for chunk in chunks:
                pending += chunk
                size += len(chunk)
                # Keep at least one byte back: only the end of the stream knows the last.
                if len(pending) > batch:
                    whole = (len(pending) - 1) // self.segment_size * self.segment_size
                    data = bytes(pending[:whole])
                    del pending[:whole]
                    await asyncio.to_thread(self._seal_write, sealer, digest, out, data, False)
            await asyncio.to_thread(self._seal_write, sealer, digest, out, bytes(pending), True)
            await asyncio.to_thread(self._finish, out, tmp, self.path(blob_id))
        except BaseException:
            out.close()
            tmp.unlink(missing_ok=True)
            raise
        stored = len(sealer.header) + size + TAG * max(1, -(-size // self.segment_size))
        return StoredBlob(blob_id, size, digest.hexdigest(), stored)

    def _seal_write(
        self, sealer: Sealer, digest: Hash, out: BinaryIO, data: bytes, final: bool
    ) -> None:
        """Seal `data` as whole segments (and, when `final`, the last one) and write it."""
        digest.update(data)
        view = memoryview(data)
        step = self.segment_size
        if not final:
            for at in range(0, len(view), step):
                out.write(sealer.seal(view[at : at + step].tobytes(), last=False))
            return
        starts = list(range(0, len(view), step)) or [0]
        for at in starts:
            out.write(sealer.seal(view[at : at + step].tobytes(), last=at == starts[-1]))

    @staticmethod
    def _finish(out: BinaryIO, tmp: Path, target: Path) -> None:
        out.flush()
        os.fsync(out.fileno())
        out.close()
        os.rename(tmp, target)

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
