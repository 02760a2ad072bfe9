"""Deleting blobs takes them out of `objects/` at once and leaves the unlinking of their
files to a thread of the blob store's own, which a staging that found its content stored
already need not wait for; a file not unlinked when the datacache died goes at the next
start, as a write's leftovers do."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.datacache.blobs import BlobStore
from services.datacache.crypto import LocalKeyProvider

KEYS = LocalKeyProvider({"k1": bytes(range(32))})
SEGMENT = 1000


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


@pytest.fixture
def unlinking_held(tmp_path: Path) -> Iterator[tuple[BlobStore, threading.Event]]:
    """A blob store whose unlinking thread waits until the event is set."""
    store = BlobStore(tmp_path, KEYS, segment_size=SEGMENT)
    release = threading.Event()
    store._unlinking.submit(release.wait)
    yield store, release
    release.set()


async def test_a_deleted_blob_is_gone_at_once_and_its_file_unlinked_after(
    unlinking_held: tuple[BlobStore, threading.Event],
) -> None:
    store, release = unlinking_held
    kept = await store.write(_chunks(os.urandom(5 * SEGMENT)))
    deleted = await store.write(_chunks(os.urandom(5 * SEGMENT)))
    await store.delete(deleted.blob_id, "0123456789abcdef")  # the second was never there
    assert [p.name for p in store.objects.iterdir()] == [kept.blob_id]
    assert not store.exists(deleted.blob_id)
    assert store.stored_bytes() == kept.stored_size
    assert [p.name for p in store.tmp.iterdir()] == [deleted.blob_id]  # not unlinked yet
    release.set()
    await store.emptied()
    assert list(store.tmp.iterdir()) == []


async def test_a_deleted_blob_not_unlinked_before_a_crash_goes_at_the_next_start(
    unlinking_held: tuple[BlobStore, threading.Event], tmp_path: Path
) -> None:
    store, _ = unlinking_held
    deleted = await store.write(_chunks(os.urandom(5 * SEGMENT)))
    await store.delete(deleted.blob_id)
    restarted = BlobStore(tmp_path, KEYS, segment_size=SEGMENT)
    restarted.cleanup_tmp()
    assert list(restarted.tmp.iterdir()) == [] and list(restarted.objects.iterdir()) == []
