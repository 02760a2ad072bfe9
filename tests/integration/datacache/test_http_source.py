"""The HTTP source against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterable
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from services.datacache.blobs import BlobStore, Readable, StoredBlob
from services.datacache.crypto import LocalKeyProvider
from services.datacache.sources.base import (
    ResultFile,
    SourceConfig,
    SourceRef,
    SourceRefused,
    SourceUnavailable,
)
from services.datacache.sources.http import HttpSource
from shared.download import Download
from tests.conftest import free_port
from tests.integration.datacache.http_origin import Origin, serve_origin
from tests.integration.datacache.support import Collect

KEYS = LocalKeyProvider({"k1": bytes(range(32))})


def _source(session: aiohttp.ClientSession, token: str | None = "t0k") -> HttpSource:
    config = SourceConfig(
        tenant="radiology", match="http://127.0.0.1", token=SecretStr(token) if token else None
    )
    return HttpSource(config, session)


async def test_download_with_the_configured_token() -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    async with (
        serve_origin(Origin(files={"scans/ct.nii": data}, token="t0k")) as origin,
        aiohttp.ClientSession() as session,
    ):
        sink = Collect()
        await _source(session).fetch(SourceRef(f"{origin.url}/scans/ct.nii"), sink)
        assert sink.files == {"ct.nii": data}
        with pytest.raises(SourceRefused, match="401"):
            await _source(session, "wrong").fetch(SourceRef(f"{origin.url}/scans/ct.nii"), sink)


class Stored:
    """A `FileSink` that stores what it is given in a blob store, as the datacache's own
    sink does: a download is read straight into the store's buffers."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self.files: dict[str, StoredBlob] = {}

    async def put(self, path: str, chunks: AsyncIterable[bytes]) -> None:
        assert isinstance(chunks, Readable)
        self.files[path] = await self.blobs.write_from(chunks)


@pytest.mark.parametrize("into", ["chunks", "blob store"])
async def test_a_broken_download_resumes_with_range_and_gets_every_byte(
    tmp_path: Path, into: str
) -> None:
    data = os.urandom(9 * 1024 * 1024)
    origin = Origin(files={"big.bin": data}, token="t0k", cut_next=2, cut_at=3_500_000)
    async with serve_origin(origin), aiohttp.ClientSession() as session:
        source = _source(session)
        if into == "chunks":
            sink = Collect()
            await source.fetch(SourceRef(f"{origin.url}/big.bin"), sink)
            assert sink.files["big.bin"] == data
        else:
            blobs = BlobStore(tmp_path, KEYS)
            stored = Stored(blobs)
            await source.fetch(SourceRef(f"{origin.url}/big.bin"), stored)
            blob = stored.files["big.bin"]
            assert (blob.size, blob.sha256) == (len(data), hashlib.sha256(data).hexdigest())
            assert b"".join([chunk async for chunk in blobs.read(blob.blob_id)]) == data
        assert origin.requests["GET"] == 3  # two cut short, each resumed where it stopped
        assert origin.body_bytes == len(data)


async def test_redirects_are_followed_and_credentials_stay_with_their_origin() -> None:
    data = os.urandom(70_000)
    async with (
        serve_origin(Origin(files={"elsewhere.bin": data})) as other,
        serve_origin(Origin(files={"ct.bin": data}, token="t0k")) as origin,
        aiohttp.ClientSession() as session,
    ):
        origin.redirects = {"moved.bin": "/ct.bin", "away.bin": f"{other.url}/elsewhere.bin"}
        sink = Collect()
        # Within the origin: the token goes along (the origin answers 401 without it).
        await _source(session).fetch(SourceRef(f"{origin.url}/moved.bin"), sink)
        # To another origin: the data come, the token does not.
        await _source(session).fetch(SourceRef(f"{origin.url}/away.bin"), sink)
        assert sink.files == {"moved.bin": data, "away.bin": data}
        assert other.authorizations == [None]
        origin.redirects["loop.bin"] = "/loop.bin"
        with pytest.raises(SourceRefused, match="redirects"):
            await _source(session).fetch(SourceRef(f"{origin.url}/loop.bin"), sink)


async def test_a_body_encoded_against_the_request_is_refused() -> None:
    origin = Origin(files={"ct.nii": b"not really gzip"}, token="t0k", encoding="gzip")
    async with serve_origin(origin), aiohttp.ClientSession() as session:
        with pytest.raises(SourceRefused, match="encoded"):
            await _source(session).fetch(SourceRef(f"{origin.url}/ct.nii"), Collect())


async def test_a_stopped_download_lets_go_of_the_source_at_once(tmp_path: Path) -> None:
    """Cancelling a staging stops its read, which waits on the network in a worker
    thread, without waiting for the source: the source here sends one chunk and then
    nothing until the gate opens, and the read's own timeout is far away."""
    origin = Origin(files={"big.bin": os.urandom(8 << 20)}, token="t0k", gate=asyncio.Event())
    async with serve_origin(origin):
        blobs = BlobStore(tmp_path, KEYS)
        download = Download(f"{origin.url}/big.bin", {"Authorization": "Bearer t0k"},
                            verify_tls=True, timeout_s=600)  # fmt: skip
        writing = asyncio.create_task(blobs.write_from(download))
        await origin.started.wait()
        writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(writing, 30)  # the guard against a hang, not a timing
        assert list(blobs.tmp.iterdir()) == [] and list(blobs.objects.iterdir()) == []
        origin.gate.set()


async def test_without_range_support_a_break_fails_the_try() -> None:
    data = os.urandom(3 * 1024 * 1024)
    origin = Origin(files={"big.bin": data}, token="t0k", ranges=False, cut_next=1, cut_at=10)
    async with serve_origin(origin), aiohttp.ClientSession() as session:
        with pytest.raises(SourceUnavailable, match=r"big\.bin"):
            await _source(session).fetch(SourceRef(f"{origin.url}/big.bin"), Collect())


async def test_version_is_the_etag_and_downloads_nothing() -> None:
    async with (
        serve_origin(Origin(files={"a": b"one"}, token="t0k")) as origin,
        aiohttp.ClientSession() as session,
    ):
        source = _source(session)
        first = await source.version(SourceRef(f"{origin.url}/a"))
        origin.files["a"] = b"two"
        second = await source.version(SourceRef(f"{origin.url}/a"))
        assert first and second and first != second
        assert origin.requests["GET"] == 0 and origin.body_bytes == 0


async def test_errors_say_which_source_and_whether_to_retry() -> None:
    async with (
        serve_origin(Origin(files={"a": b"x"}, token="t0k", fail_next=1)) as origin,
        aiohttp.ClientSession() as session,
    ):
        source = _source(session)
        with pytest.raises(SourceUnavailable, match=f"{origin.url}/a.*503"):
            await source.fetch(SourceRef(f"{origin.url}/a"), Collect())
        with pytest.raises(SourceRefused, match="404"):
            await source.fetch(SourceRef(f"{origin.url}/missing"), Collect())
    async with aiohttp.ClientSession() as session:
        down = f"http://127.0.0.1:{free_port()}/a"
        with pytest.raises(SourceUnavailable, match=down):
            await _source(session).fetch(SourceRef(down), Collect())


def test_credentials_in_the_uri_are_refused_and_spellings_are_canonical() -> None:
    source = HttpSource(None, None)  # type: ignore[arg-type]
    with pytest.raises(SourceRefused, match="credentials"):
        source.canonical(SourceRef("https://user:pw@host.example/a"))
    assert (
        source.canonical(SourceRef("HTTPS://Host.Example:443/a?b=1#frag"))
        == "https://host.example/a?b=1"
    )


async def test_upload_puts_each_result_file() -> None:
    async def content() -> AsyncIterable[bytes]:
        yield b"mask"

    async with serve_origin(Origin(token="t0k")) as origin, aiohttp.ClientSession() as session:
        files = [ResultFile(path="seg/mask.nii", size=4, open=content)]  # type: ignore[arg-type]
        summary = await _source(session).upload(SourceRef(f"{origin.url}/results/j1"), files)
        assert origin.uploads == {"results/j1/seg/mask.nii": b"mask"}
        assert "1 files" in summary
