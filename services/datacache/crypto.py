"""Encryption at rest, the datacache's side: master keys, and sealing new objects.

The format of a stored object is `shared.sealed` (a node opens objects with it too).
Each object is sealed under a fresh data key, wrapped by a master key held by a
`KeyProvider`: a file or the environment here, a KMS in production (the interface is
the plug). Only the datacache unwraps a data key: `data_key` does it for the objects
a node may read and for the datacache's own reads.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.sealed import (
    KEY_BYTES,
    PREFIX_BYTES,
    Header,
    IntegrityError,
    nonce,
    pack_header,
)


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


class Sealer:
    """Seals one object's segments under a fresh data key. Each segment is sealed on its
    own, given its place, so several can be sealed at once in different threads."""

    def __init__(self, keys: KeyProvider, segment_size: int) -> None:
        data_key = AESGCM.generate_key(256)
        key_id, wrapped = keys.wrap(data_key)
        self.segment_size = segment_size
        self._prefix = os.urandom(PREFIX_BYTES)
        self.header = pack_header(segment_size, self._prefix, key_id, wrapped)
        self._aead = AESGCM(data_key)

    def seal_into(self, index: int, plaintext: memoryview, last: bool, out: memoryview) -> None:
        """Seal segment `index` of the object (`last` for the final one, perhaps empty)
        into `out`, exactly `len(plaintext) + TAG` bytes: the caller's buffer, reused,
        rather than a new one per segment."""
        if len(plaintext) > self.segment_size or (not last and len(plaintext) != self.segment_size):
            raise ValueError("segments are full except the last")
        self._aead.encrypt_into(nonce(self._prefix, index, last), plaintext, self.header, out)


def data_key(header: Header, keys: KeyProvider) -> bytes:
    """The object's data key, unwrapped by the master key that wrapped it."""
    return keys.unwrap(header.key_id, header.wrapped)
