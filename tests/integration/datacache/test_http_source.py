"""The HTTP source against a real HTTP server on loopback."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable

import aiohttp
import pytest
from pydantic import SecretStr

from services.datacache.sources.base import (
    ResultFile,
    SourceConfig,
    SourceRef,
    SourceRefused,
    SourceUnavailable,
)
from services.datacache.sources.http import HttpSource
from tests.conftest import free_port
from tests.integration.datacache.http_origin import Origin, serve_origin
from tests.integration.datacache.support import Collect


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


async def test_a_broken_download_resumes_with_range_and_gets_every_byte() -> None:
    data = os.urandom(5 * 1024 * 1024)
    origin = Origin(files={"big.bin": data}, token="t0k", cut_next=2, cut_at=1_500_000)
    async with serve_origin(origin), aiohttp.ClientSession() as session:
        sink = Collect()
        await _source(session).fetch(SourceRef(f"{origin.url}/big.bin"), sink)
        assert sink.files["big.bin"] == data
        assert origin.requests["GET"] == 3  # two cut short, each resumed where it stopped
        assert origin.body_bytes == len(data)


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
