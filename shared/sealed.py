"""The at-rest format of cached objects: what the datacache seals and a node opens.

Segmented AES-256-GCM with a fresh data key per object::

    header   = MAGIC "MHV1" | segment size (4, big endian) | nonce prefix (7)
               | key id length (1) | key id | wrapped key length (2) | wrapped data key
    segments = AES-256-GCM(data key, nonce = prefix | counter (4) | last flag (1),
                           plaintext of `segment size` bytes (the last: 0..size),
                           associated data = header) -> ciphertext | tag (16)

Why this and not a one-shot or a library stream: `cryptography`'s one-shot AESGCM refuses
more than 2^31-1 bytes, and its streaming decryptor hands out plaintext before it has
checked the tag. Here every segment is authenticated before a byte of it is used, the
counter in the nonce fixes each segment's place (reordering fails), the last-flag
makes truncation at a segment boundary fail, and the header is associated data of every
segment (editing it, or swapping headers between objects, fails). A segment can be
opened on its own, which is what serving a byte range needs, and so is sealing or
opening several at once on different cores.

Only the datacache holds the master keys that unwrap a data key (`services.datacache.
crypto`). A node opens an object with the data key the datacache hands it, for the
objects of its live grant only; this module is all it needs for that.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"MHV1"
TAG = 16
KEY_BYTES = 32
PREFIX_BYTES = 7
#: magic, segment size, nonce prefix, key id length
_FIXED = struct.Struct(">4sI7sB")
#: How a sealed object travels to a node: its data key (base64) and plaintext size go in
#: these response headers, the stored bytes in the body.
DATA_KEY_HEADER = "X-Medhive-Data-Key"
SIZE_HEADER = "X-Medhive-Size"
#: Headers are at most this long (255-byte key id, 2-byte length, wrapped key).
HEADER_BYTES_MAX = _FIXED.size + 255 + 2 + 1024


class IntegrityError(Exception):
    """A stored object failed authentication: tampered, truncated, or not ours."""


def nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def pack_header(segment_size: int, prefix: bytes, key_id: str, wrapped: bytes) -> bytes:
    kid = key_id.encode()
    return (
        _FIXED.pack(MAGIC, segment_size, prefix, len(kid))
        + kid
        + struct.pack(">H", len(wrapped))
        + wrapped
    )


@dataclass(frozen=True)
class Header:
    """An object's header, parsed; `raw` is its bytes (the segments' associated data)."""

    raw: bytes
    segment_size: int
    prefix: bytes
    key_id: str
    wrapped: bytes

    @classmethod
    def parse(cls, raw: bytes | bytearray) -> Header:
        """The header at the start of `raw` (at least `header_length(raw)` bytes)."""
        try:
            magic, size, prefix, kid_len = _FIXED.unpack_from(raw)
            if magic != MAGIC or not 0 < size <= 1 << 30:
                raise IntegrityError("not a medhive object (bad header)")
            at = _FIXED.size
            key_id = raw[at : at + kid_len].decode()
            (wrapped_len,) = struct.unpack_from(">H", raw, at + kid_len)
            start = at + kid_len + 2
            wrapped = raw[start : start + wrapped_len]
            if len(wrapped) != wrapped_len:
                raise IntegrityError("truncated header")
        except (struct.error, UnicodeDecodeError) as exc:
            raise IntegrityError("not a medhive object (bad header)") from exc
        return cls(bytes(raw[: start + wrapped_len]), size, prefix, key_id, bytes(wrapped))


def read_header(read_exactly: Callable[[int], bytes | bytearray]) -> Header:
    """The header at the start of a stream, read with `read_exactly(n)` (which returns
    n bytes or raises; blocking): no byte past it is taken."""
    fixed = read_exactly(_FIXED.size)
    if fixed[:4] != MAGIC:
        raise IntegrityError("not a medhive object (bad header)")
    key_id_and_length = read_exactly(fixed[-1] + 2)
    wrapped = read_exactly(int.from_bytes(key_id_and_length[-2:], "big"))
    return Header.parse(fixed + key_id_and_length + wrapped)


@dataclass(frozen=True)
class Opener:
    """Opens the segments of one stored object, given its header and data key."""

    header: bytes
    segment_size: int
    prefix: bytes
    aead: AESGCM

    @classmethod
    def with_key(cls, header: Header, data_key: bytes) -> Opener:
        return cls(header.raw, header.segment_size, header.prefix, AESGCM(data_key))

    def plaintext_size(self, stored_size: int) -> int:
        body = stored_size - len(self.header)
        size = body - self.segments(stored_size) * TAG
        if size < 0:
            raise IntegrityError("truncated: shorter than its last segment's tag")
        return size

    def segments(self, stored_size: int) -> int:
        """How many segments an object of `stored_size` bytes has (at least one)."""
        return max(1, -(-(stored_size - len(self.header)) // (self.segment_size + TAG)))

    def segment_span(self, index: int) -> tuple[int, int]:
        """Where segment `index`'s ciphertext starts in the file, and its full length."""
        full = self.segment_size + TAG
        return len(self.header) + index * full, full

    def open(self, index: int, ciphertext: bytes | memoryview, last: bool) -> bytes:
        try:
            return self.aead.decrypt(nonce(self.prefix, index, last), ciphertext, self.header)
        except InvalidTag as exc:
            where = "last segment" if last else "segment"
            raise IntegrityError(f"{where} {index} failed authentication") from exc

    def open_run(
        self, raw: bytes | bytearray | memoryview, first: int, count: int, last: int
    ) -> list[bytes]:
        """The plaintext of `count` consecutive segments from `first`, whose ciphertext
        `raw` should hold, in an object whose final segment is `last`. Blocking: for a
        worker thread (AES-GCM releases the GIL, so runs open at once on several cores)."""
        full = self.segment_size + TAG
        view, plain = memoryview(raw), []
        for k in range(count):
            piece = view[k * full : (k + 1) * full]
            is_last = first + k == last
            if (len(piece) < full and not is_last) or len(piece) < TAG:
                raise IntegrityError(f"truncated at segment {first + k}")
            plain.append(self.open(first + k, piece, is_last))
        return plain
