"""Blobs are written around the page cache where the filesystem allows it, and the
same bytes land where it does not."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.datacache import blobs
from services.datacache.blobs import SEAL_BATCH, BlobStore
from services.datacache.crypto import LocalKeyProvider

KEYS = LocalKeyProvider({"k1": bytes(range(32))})
MIB = 1 << 20


async def _chunks(data: bytes, step: int = 65536) -> AsyncIterator[bytes]:
    for at in range(0, len(data), step):
        yield data[at : at + step]


def _cached_bytes(path: Path) -> int:
    """How much of the file is in the page cache (util-linux's `fincore`)."""
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return int(out.split()[0])


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A filesystem that refuses direct I/O (ramfs: `open` with O_DIRECT fails EINVAL)."""
    root = tmp_path / "ramfs"
    root.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "medhive-test", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True)


@pytest.fixture
def large_sectors(tmp_path: Path) -> Iterator[Path]:
    """An ext4 filesystem on a loop device of 4 KiB sectors: direct writes there must be
    aligned to 4 KiB, and a writer that aligns to less is refused (`EINVAL`)."""
    image, root = tmp_path / "disk.img", tmp_path / "large-sectors"
    root.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    device = subprocess.run(["losetup", "--sector-size", "4096", "-f", "--show", str(image)],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    try:
        subprocess.run(["mkfs.ext4", "-q", device], check=True)
        subprocess.run(["mount", device, str(root)], check=True)
        try:
            yield root
        finally:
            subprocess.run(["umount", str(root)], check=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


async def test_a_staged_blob_does_not_fill_the_page_cache(tmp_path: Path) -> None:
    """A GiB staged would push a GiB of what is read now out of the cache, and copying
    it there was a quarter of staging's CPU."""
    store = BlobStore(tmp_path, KEYS)
    data = os.urandom(3 * SEAL_BATCH * MIB + 12345)  # three batches and a short one
    blob = await store.write(_chunks(data))
    path = store.path(blob.blob_id)
    assert _cached_bytes(path) < 64 * 1024  # at most a block or two read back
    assert await store.verify(blob.blob_id) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [MIB + 1, SEAL_BATCH * MIB, 2 * SEAL_BATCH * MIB + 4095])
async def test_without_direct_io_the_same_bytes_are_stored(
    tmp_path: Path, ramfs: Path, size: int
) -> None:
    """On a filesystem without direct I/O the blob goes through the page cache, and is
    the same: same length, readable, with the same digest."""
    data = os.urandom(size)
    blobs = []
    for root in (tmp_path / "disk", ramfs):
        store = BlobStore(root, KEYS)
        blob = await store.write(_chunks(data, 100_000))
        assert blob.sha256 == hashlib.sha256(data).hexdigest()
        assert store.stored_size(blob.blob_id) == blob.stored_size
        assert b"".join([c async for c in store.read(blob.blob_id)]) == data
        blobs.append(blob)
    assert blobs[0].stored_size == blobs[1].stored_size
    assert not any((ramfs / "tmp").iterdir())  # the refused open left nothing behind


async def test_a_disk_with_blocks_larger_than_ours_gets_the_blob_through_the_page_cache(
    large_sectors: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct writes are aligned to `BLOCK`; a disk with larger blocks refuses them
    mid-file, and the rest of the blob goes through the page cache, whole and readable."""
    monkeypatch.setattr(blobs, "BLOCK", 512)  # our blocks smaller than the disk's
    store = BlobStore(large_sectors, KEYS)
    data = os.urandom(2 * SEAL_BATCH * MIB + 777)
    blob = await store.write(_chunks(data))
    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    assert store.stored_size(blob.blob_id) == blob.stored_size
    assert b"".join([c async for c in store.read(blob.blob_id)]) == data


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A filesystem of 6 MiB (a tmpfs): a blob of more fills it mid-write."""
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "medhive-test", str(root)],
                   check=True)  # fmt: skip
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True)


async def test_a_disk_that_fills_mid_blob_fails_the_write_and_keeps_nothing(
    small_disk: Path,
) -> None:
    """The write that meets a full disk fails the blob with the disk's own error; the
    writes queued behind it write nothing, the file is removed, and the store goes on."""
    store = BlobStore(small_disk, KEYS)
    with pytest.raises(OSError) as failed:
        await store.write(_chunks(os.urandom(4 * SEAL_BATCH * MIB)))
    assert failed.value.errno == errno.ENOSPC
    assert list(store.tmp.iterdir()) == [] and list(store.objects.iterdir()) == []
    data = os.urandom(SEAL_BATCH * MIB + 1)
    blob = await store.write(_chunks(data))
    assert await store.verify(blob.blob_id) == hashlib.sha256(data).hexdigest()
