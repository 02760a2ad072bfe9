"""The at-rest format: round trips, ranges, and every kind of tampering refused."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.datacache.blobs import BATCH, BlobStore
from services.datacache.crypto import LocalKeyProvider
from services.vmnode.jobdata import unseal
from shared.sealed import IntegrityError

SEGMENT = 1000


async def _chunks(data: bytes, step: int = 777) -> AsyncIterator[bytes]:
    for at in range(0, len(data), step):
        yield data[at : at + step]
        await asyncio.sleep(0)  # as a network source would, letting other writes run


def _keys(*ids: str) -> LocalKeyProvider:
    return LocalKeyProvider({key_id: os.urandom(32) for key_id in ids or ("k1",)})


async def _read(store: BlobStore, blob_id: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(blob_id, start, end)])


async def _unsealed(store: BlobStore, blob_id: str) -> bytes:
    """What a node makes of the blob: the stored bytes, opened with the key it is sent."""
    sealed = store.sealed(blob_id)
    raw = sealed.path.read_bytes()
    out = io.BytesIO()
    digest = await asyncio.to_thread(unseal, io.BytesIO(raw), len(raw), sealed.data_key, out)
    assert digest == hashlib.sha256(out.getvalue()).hexdigest()
    return out.getvalue()


#: Sizes around the segment and the batch (a stream longer than a segment is sealed in
#: batches of `BATCH` segments, in buffers used again for later batches).
SIZES = [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 5 * SEGMENT + 17, BATCH * SEGMENT,
         BATCH * SEGMENT + 1, 2 * BATCH * SEGMENT, 3 * BATCH * SEGMENT + 17]  # fmt: skip


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("step", [777, 2 * BATCH * SEGMENT + 5])
async def test_round_trip_and_ranges(tmp_path: Path, size: int, step: int) -> None:
    store = BlobStore(tmp_path, _keys(), segment_size=SEGMENT)
    data = os.urandom(size)
    blob = await store.write(_chunks(data, step))
    assert (blob.size, store.size(blob.blob_id)) == (size, size)
    assert blob.stored_size == store.stored_size(blob.blob_id)
    assert await _read(store, blob.blob_id) == data
    assert await _unsealed(store, blob.blob_id) == data
    rng = random.Random(size)
    for _ in range(25 if size else 0):
        start = rng.randrange(size)
        end = rng.randrange(start, size + 1)
        assert await _read(store, blob.blob_id, start, end) == data[start:end]


async def test_writes_at_once_each_keep_their_bytes(tmp_path: Path) -> None:
    """Batch buffers go back to the store and to the next write: while four long
    streams are written at once, none may see another's bytes or a buffer still in use."""
    store = BlobStore(tmp_path, _keys(), segment_size=SEGMENT)
    streams = [os.urandom(3 * BATCH * SEGMENT + 100 * i) for i in range(4)]
    for _ in range(2):  # the second round reuses the first round's buffers
        blobs = await asyncio.gather(*(store.write(_chunks(data, 1500)) for data in streams))
        for data, blob in zip(streams, blobs, strict=True):
            assert blob.sha256 == hashlib.sha256(data).hexdigest()
            assert await _read(store, blob.blob_id) == data
            assert await _unsealed(store, blob.blob_id) == data


def _tampered(raw: bytes, kind: str) -> bytes:
    full = SEGMENT + 16
    header = len(raw) - (5 * full + 16 + 17)  # five full segments and a 17-byte last one
    middle = header + 2 * full + 5
    return {
        "header": raw[:6] + bytes([raw[6] ^ 1]) + raw[7:],
        "segment": raw[:middle] + bytes([raw[middle] ^ 1]) + raw[middle + 1 :],
        "tag": raw[:-1] + bytes([raw[-1] ^ 1]),
        "cut at a segment boundary": raw[: header + 5 * full],
        "cut mid-segment": raw[:-7],
        "appended": raw + b"\0" * 20,
        "segments swapped": raw[:header]
        + raw[header + full : header + 2 * full]
        + raw[header : header + full]
        + raw[header + 2 * full :],
    }[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "header",
        "segment",
        "tag",
        "cut at a segment boundary",
        "cut mid-segment",
        "appended",
        "segments swapped",
    ],
)
@pytest.mark.parametrize("reader", ["datacache", "node"])
async def test_tampering_is_detected(tmp_path: Path, kind: str, reader: str) -> None:
    store = BlobStore(tmp_path, _keys(), segment_size=SEGMENT)
    blob = await store.write(_chunks(os.urandom(5 * SEGMENT + 17)))
    path = store.path(blob.blob_id)
    path.write_bytes(_tampered(path.read_bytes(), kind))
    with pytest.raises(IntegrityError):
        await (_read if reader == "datacache" else _unsealed)(store, blob.blob_id)


async def test_headers_swapped_between_objects_are_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, _keys(), segment_size=SEGMENT)
    a = await store.write(_chunks(os.urandom(3000)))
    b = await store.write(_chunks(os.urandom(3000)))
    raw_a, raw_b = store.path(a.blob_id).read_bytes(), store.path(b.blob_id).read_bytes()
    header = len(raw_a) - 3 * (SEGMENT + 16)
    store.path(a.blob_id).write_bytes(raw_b[:header] + raw_a[header:])
    with pytest.raises(IntegrityError):
        await _read(store, a.blob_id)


async def test_another_master_key_opens_nothing_and_rotation_keeps_old_objects(
    tmp_path: Path,
) -> None:
    old = os.urandom(32)
    store = BlobStore(tmp_path, LocalKeyProvider({"k1": old}), segment_size=SEGMENT)
    blob = await store.write(_chunks(b"patient data"))
    stranger = BlobStore(tmp_path, LocalKeyProvider({"k1": os.urandom(32)}))
    with pytest.raises(IntegrityError, match="does not unwrap"):
        await _read(stranger, blob.blob_id)
    rotated = LocalKeyProvider({"k2": os.urandom(32), "k1": old})
    store = BlobStore(tmp_path, rotated, segment_size=SEGMENT)
    assert await _read(store, blob.blob_id) == b"patient data"
    fresh = await store.write(_chunks(b"new"))
    assert b"k2" in store.path(fresh.blob_id).read_bytes()[:64]
    without_k1 = BlobStore(tmp_path, LocalKeyProvider({"k2": os.urandom(32)}))
    with pytest.raises(IntegrityError, match="unknown master key 'k1'"):
        await _read(without_k1, blob.blob_id)


async def test_no_plaintext_at_rest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, _keys())
    random_data = os.urandom(256 * 1024)
    repetitive = b"PatientName=DOE^JOHN;" * 20000
    for data in (random_data, repetitive):
        await store.write(_chunks(data, 4096))
    files = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    for data in (random_data, repetitive):
        windows = {data[at : at + 16] for at in range(0, len(data) - 16, 997)}
        assert not any(w in content for content in files for w in windows)


async def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, _keys(), segment_size=SEGMENT)

    async def broken() -> AsyncIterator[bytes]:
        yield os.urandom(10 * SEGMENT)
        raise ConnectionError("source went away")

    with pytest.raises(ConnectionError):
        await store.write(broken())
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_key_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    LocalKeyProvider.generate_key_file(path)
    assert LocalKeyProvider.from_file(path).current_key_id == "k1"
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        LocalKeyProvider.from_file(path)
    text = f"# rotated\nk2:{base64.b64encode(os.urandom(32)).decode()}\nk1:{path.read_text()[3:]}"
    assert LocalKeyProvider.from_env(text).current_key_id == "k2"
