"""Reading a ZIP archive as it downloads, entry by entry, without a temporary file.

XNAT hands a resource out as a zip. Spooling it to disk first would put patient data
on disk in the clear; instead the local file headers are followed in stream order and
each entry is inflated straight into the (encrypting) sink. Entries are checked against
their CRC-32; zip64 sizes and data descriptors (what Java's ZipOutputStream, and so
XNAT, writes) are understood. Encrypted and multi-disk archives are refused.

Inflating is bounded, because a few bytes of deflate can stand for gigabytes: each step
yields at most `CHUNK` bytes, an entry may not grow past the size its header or the
caller's listing declares for it, and the whole archive not past `max_total`. Past a
bound the archive is refused as a whole (a `ZipError`, not worth retrying).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import AsyncIterator, Callable

LOCAL = 0x04034B50
CENTRAL = 0x02014B50
END = 0x06054B50
DESCRIPTOR = 0x08074B50
STORED, DEFLATED = 0, 8
CHUNK = 1 << 20


class ZipError(Exception):
    """The stream is not a zip this reader can take."""


class _Stream:
    """Exact reads over an async iterator of byte chunks."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""

    async def _more(self) -> bool:
        try:
            self.buffer += await anext(self.chunks)
            return True
        except StopAsyncIteration:
            return False

    async def exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self._more():
                raise ZipError("the archive ends in the middle of an entry")
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    async def some(self, limit: int) -> bytes:
        if not self.buffer and not await self._more():
            raise ZipError("the archive ends in the middle of an entry")
        out, self.buffer = self.buffer[:limit], self.buffer[limit:]
        return out

    def unread(self, data: bytes) -> None:
        self.buffer = data + self.buffer


class _Budget:
    """What an entry, and the archive, may still inflate to."""

    def __init__(self, max_total: int | None) -> None:
        self.max_total = max_total
        self.total = 0

    def spend(self, name: str, entry_bytes: int, entry_limit: int | None, more: int) -> None:
        if entry_limit is not None and entry_bytes + more > entry_limit:
            raise ZipError(f"{name}: inflates past the {entry_limit} bytes declared for it")
        self.total += more
        if self.max_total is not None and self.total > self.max_total:
            raise ZipError(f"the archive inflates past the {self.max_total} bytes declared for it")


async def entries(
    chunks: AsyncIterator[bytes],
    declared: Callable[[str], int | None] | None = None,
    max_total: int | None = None,
) -> AsyncIterator[tuple[str, AsyncIterator[bytes]]]:
    """(name, content) for each file entry, in archive order. Each content must be read to
    its end before the next entry is asked for.

    `declared` gives the size a listing declares for an entry's name, if it does;
    `max_total` bounds the whole archive (see the module's docstring).
    """
    stream = _Stream(chunks)
    budget = _Budget(max_total)
    while True:
        (signature,) = struct.unpack("<I", await stream.exact(4))
        if signature in (CENTRAL, END):
            return
        if signature != LOCAL:
            raise ZipError(f"unexpected record 0x{signature:08x}")
        header = await stream.exact(26)
        _, flags, method, _, _, crc, packed, size, name_len, extra_len = struct.unpack(
            "<HHHHHIIIHH", header
        )
        name = (await stream.exact(name_len)).decode("utf-8" if flags & 0x800 else "cp437")
        extra = await stream.exact(extra_len)
        if flags & 0x1:
            raise ZipError(f"{name}: encrypted entries are not supported")
        zip64 = False
        at = 0
        while at + 4 <= len(extra):
            tag, length = struct.unpack_from("<HH", extra, at)
            if tag == 0x0001:
                zip64 = True
                values = list(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
                if size == 0xFFFFFFFF and values:
                    size = values.pop(0)
                if packed == 0xFFFFFFFF and values:
                    packed = values.pop(0)
            at += 4 + length
        if method not in (STORED, DEFLATED):
            raise ZipError(f"{name}: compression method {method} is not supported")
        if method == STORED and flags & 0x08 and packed == 0:
            raise ZipError(f"{name}: a stored entry without its size cannot be streamed")
        known = not (flags & 0x08) or size not in (0, 0xFFFFFFFF)
        listed = declared(name) if declared is not None else None
        limits = [n for n in (size if known else None, listed) if n is not None]
        state = {"crc": 0}
        content = _bounded(name, _content(stream, method, packed, state), min(limits, default=None),
                           budget)  # fmt: skip
        if name.endswith("/"):  # a directory entry
            async for _ in content:
                pass
        else:
            yield name, content
            async for _ in content:  # whatever the consumer left unread
                pass
        if flags & 0x08:
            descriptor = await stream.exact(4)
            if struct.unpack("<I", descriptor)[0] != DESCRIPTOR:
                stream.unread(descriptor)
            crc = struct.unpack("<I", await stream.exact(4))[0]
            await stream.exact(16 if zip64 else 8)
        if state["crc"] != crc:
            raise ZipError(f"{name}: CRC-32 mismatch, the archive is damaged")


async def _bounded(
    name: str, content: AsyncIterator[bytes], limit: int | None, budget: _Budget
) -> AsyncIterator[bytes]:
    done = 0
    async for data in content:
        budget.spend(name, done, limit, len(data))
        done += len(data)
        yield data


async def _content(
    stream: _Stream, method: int, packed: int, state: dict[str, int]
) -> AsyncIterator[bytes]:
    if method == STORED:
        left = packed
        while left:
            data = await stream.some(min(left, CHUNK))
            left -= len(data)
            state["crc"] = zlib.crc32(data, state["crc"])
            yield data
        return
    inflate = zlib.decompressobj(-15)
    pending = b""
    while not inflate.eof:
        # At most CHUNK bytes a step: what is left of the input waits in
        # `unconsumed_tail` for the next step instead of inflating all at once.
        data = inflate.decompress(pending or await stream.some(CHUNK), CHUNK)
        pending = inflate.unconsumed_tail
        if inflate.unused_data:
            stream.unread(inflate.unused_data)
        if data:
            state["crc"] = zlib.crc32(data, state["crc"])
            yield data
    if rest := inflate.flush():
        state["crc"] = zlib.crc32(rest, state["crc"])
        yield rest
