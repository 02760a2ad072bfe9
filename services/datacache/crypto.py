"""Encryption at rest: segmented AES-256-GCM with a fresh data key per object.

Format of one stored object::

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
opened on its own, which is what serving a byte range needs.

The data key is wrapped by a master key held by a `KeyProvider`: a file or the
environment here, a KMS in production (the interface is the plug).
"""

from __future__ import annotations

import base64
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"MHV1"
TAG = 16
KEY_BYTES = 32
PREFIX_BYTES = 7
#: magic, segment size, nonce prefix, key id length
_FIXED = struct.Struct(">4sI7sB")


class IntegrityError(Exception):
    """A stored object failed authentication: tampered, truncated, or not ours."""


class KeyProvider(Protocol):
    """Wraps and unwraps data keys with a master key. A KMS implementation plugs in here:
    `wrap` asks the KMS to encrypt a data key, `unwrap` to decrypt one; the master key
    never has to leave it."""

    @property
    def current_key_id(self) -> str: ...

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        """(key id, wrapped key) under the current master key."""
        ...

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        """The data key; `IntegrityError` if it was not wrapped by that key."""
        ...


class LocalKeyProvider:
    """Master keys from a file or an environment variable: lines of `key_id:base64`.

    The first key wraps new data keys; every listed key unwraps, so a key is rotated by
    putting a new line first and keeping the old one until its objects are gone. Keys
    wrap with AES-256-GCM and the key id as associated data (a random 96-bit nonce each:
    a few data keys per object are far from the nonce-collision bound).
    """

    def __init__(self, keys: dict[str, bytes]) -> None:
        if not keys:
            raise ValueError("no master key given")
        for key_id, key in keys.items():
            if len(key) != KEY_BYTES:
                raise ValueError(f"master key {key_id!r} is not {KEY_BYTES} bytes")
        self._keys = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._current = next(iter(keys))

    @classmethod
    def from_text(cls, text: str) -> LocalKeyProvider:
        keys: dict[str, bytes] = {}
        for line in (raw.strip() for raw in text.splitlines()):
            if not line or line.startswith("#"):
                continue
            key_id, sep, value = line.rpartition(":")
            keys[key_id if sep else "k1"] = base64.b64decode(value, validate=True)
        return cls(keys)

    @classmethod
    def from_env(cls, value: str) -> LocalKeyProvider:
        return cls.from_text(value)

    @classmethod
    def from_file(cls, path: Path) -> LocalKeyProvider:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(
                f"master key file {path} is readable by others (mode {oct(mode & 0o777)}); "
                "chmod 600 it"
            )
        return cls.from_text(path.read_text())

    @staticmethod
    def generate_key_file(path: Path, key_id: str = "k1") -> None:
        """Write a fresh master key, readable by its owner only."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{key_id}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}\n")

    @property
    def current_key_id(self) -> str:
        return self._current

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        nonce = os.urandom(12)
        return self._current, nonce + self._keys[self._current].encrypt(
            nonce, data_key, self._current.encode()
        )

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        master = self._keys.get(key_id)
        if master is None:
            raise IntegrityError(f"object wrapped by unknown master key {key_id!r}")
        try:
            return master.decrypt(wrapped[:12], wrapped[12:], key_id.encode())
        except InvalidTag as exc:
            raise IntegrityError(f"data key does not unwrap with master key {key_id!r}") from exc


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class Sealer:
    """Seals one object's segments, in order, under a fresh data key."""

    def __init__(self, keys: KeyProvider, segment_size: int) -> None:
        data_key = AESGCM.generate_key(256)
        key_id, wrapped = keys.wrap(data_key)
        self.segment_size = segment_size
        self._prefix = os.urandom(PREFIX_BYTES)
        kid = key_id.encode()
        self.header = (
            _FIXED.pack(MAGIC, segment_size, self._prefix, len(kid))
            + kid
            + struct.pack(">H", len(wrapped))
            + wrapped
        )
        self._aead = AESGCM(data_key)
        self._index = 0

    def seal(self, plaintext: bytes | memoryview, last: bool) -> bytes:
        if len(plaintext) > self.segment_size or (not last and len(plaintext) != self.segment_size):
            raise ValueError("segments are full except the last")
        nonce = _nonce(self._prefix, self._index, last)
        self._index += 1
        return self._aead.encrypt(nonce, plaintext, self.header)


@dataclass(frozen=True)
class Opener:
    """Opens the segments of one stored object, given its header."""

    header: bytes
    segment_size: int
    prefix: bytes
    aead: AESGCM

    @classmethod
    def read_header(cls, raw: bytes, keys: KeyProvider) -> Opener:
        """Parse the header at the start of `raw` (at least `header_bytes_max` bytes)."""
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
        data_key = keys.unwrap(key_id, wrapped)
        return cls(raw[: start + wrapped_len], size, prefix, AESGCM(data_key))

    def plaintext_size(self, stored_size: int) -> int:
        body = stored_size - len(self.header)
        segments = max(1, -(-body // (self.segment_size + TAG)))
        size = body - segments * TAG
        if size < 0:
            raise IntegrityError("truncated: shorter than its last segment's tag")
        return size

    def segment_span(self, index: int) -> tuple[int, int]:
        """Where segment `index`'s ciphertext starts in the file, and its full length."""
        full = self.segment_size + TAG
        return len(self.header) + index * full, full

    def open(self, index: int, ciphertext: bytes, last: bool) -> bytes:
        try:
            return self.aead.decrypt(_nonce(self.prefix, index, last), ciphertext, self.header)
        except InvalidTag as exc:
            where = "last segment" if last else "segment"
            raise IntegrityError(f"{where} {index} failed authentication") from exc


#: Headers are at most this long (255-byte key id, 2-byte length, wrapped key).
HEADER_BYTES_MAX = _FIXED.size + 255 + 2 + 1024
