"""The XNAT source, against the XNAT stand-in; and the stand-in against xnatpy, XNAT's
own Python client, to show that it answers the way XNAT does."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import xnat
from pydantic import SecretStr

from services.datacache.sources.base import (
    ResultFile,
    SourceConfig,
    SourceRef,
    SourceRefused,
    SourceUnavailable,
)
from services.datacache.sources.xnat import XnatSource
from services.datacache.sources.zipstream import ZipError, entries
from tests.conftest import free_port
from tests.fixtures.xnat import Xnat
from tests.integration.datacache.support import Collect

SCAN = "projects/P1/subjects/S1/experiments/E1/scans/2/resources/DICOM"


def _arrange(server: Xnat) -> dict[str, bytes]:
    files = {"1.dcm": os.urandom(200_000), "2.dcm": os.urandom(3000), "sub/3.dcm": b"x" * 5000}
    for name, data in files.items():
        server.add_file("P1", "S1", "E1", "2", "DICOM", name, data)
    return files


def _source(
    session: aiohttp.ClientSession,
    server: Xnat,
    user: str | None = None,
    password: str | None = None,
) -> XnatSource:
    config = SourceConfig(
        tenant="t",
        match="xnat://xnat.example",
        base_url=server.url,
        username=user or server.username,
        password=SecretStr(password or server.password),
    )
    return XnatSource(config, session)


def _ref(path: str = SCAN) -> SourceRef:
    return SourceRef(f"xnat://xnat.example/{path}")


async def test_xnatpy_logs_in_lists_downloads_and_uploads(
    xnat_server: Xnat, tmp_path: Path
) -> None:
    """xnatpy's own login flow and REST calls (without its XSD-built data model, which
    needs XNAT's schema files: the stand-in serves the REST API, not the schemas)."""
    files = _arrange(xnat_server)

    def as_a_client() -> None:
        with xnat.connect(
            xnat_server.url,
            user=xnat_server.username,
            password=xnat_server.password,
            no_parse_model=True,
            loglevel="ERROR",
        ) as session:
            projects = session.get_json("/data/projects")["ResultSet"]["Result"]
            assert [p["ID"] for p in projects] == ["P1"]
            exps = session.get_json("/data/projects/P1/subjects/S1/experiments")
            exp_id = exps["ResultSet"]["Result"][0]["ID"]
            scans = session.get_json(f"/data/experiments/{exp_id}/scans")["ResultSet"]["Result"]
            assert [s["ID"] for s in scans] == ["2"]
            listing = session.get_json(f"/data/experiments/{exp_id}/scans/2/resources/DICOM/files")
            rows = listing["ResultSet"]["Result"]  # `Name` is a base name, the path in `URI`
            assert sorted(r["URI"].partition("/files/")[2] for r in rows) == sorted(files)
            session.download_zip(f"/data/archive/{SCAN}/files", tmp_path / "r.zip", verbose=False)
            session.download(f"/data/{SCAN}/files/1.dcm", tmp_path / "1.dcm", verbose=False)
            session.upload_string(f"/data/{SCAN}/files/new.txt?inbody=true", "hello")

    await asyncio.to_thread(as_a_client)
    with zipfile.ZipFile(tmp_path / "r.zip") as archive:
        assert "E1/scans/2-T1/resources/DICOM/files/1.dcm" in archive.namelist()
        assert archive.read("E1/scans/2-T1/resources/DICOM/files/sub/3.dcm") == files["sub/3.dcm"]
    assert (tmp_path / "1.dcm").read_bytes() == files["1.dcm"]
    assert xnat_server.files("P1", "S1", "E1", "2", "DICOM")["new.txt"] == b"hello"
    assert xnat_server.requests["PUT auth"] == 1  # xnatpy logged in with a session
    assert xnat_server.requests["DELETE JSESSION"] == 1  # and logged out
    assert not xnat_server.sessions


async def test_a_scan_resource_is_fetched_byte_for_byte(xnat_server: Xnat) -> None:
    files = _arrange(xnat_server)
    async with aiohttp.ClientSession() as session:
        sink = Collect()
        await _source(session, xnat_server).fetch(_ref(), sink)
    assert {k: hashlib.sha256(v).hexdigest() for k, v in sink.files.items()} == {
        k: hashlib.sha256(v).hexdigest() for k, v in files.items()
    }
    assert xnat_server.requests["GET zip"] == 1
    assert not xnat_server.sessions  # the datacache logged out


async def test_the_version_follows_the_listing_without_downloading(xnat_server: Xnat) -> None:
    _arrange(xnat_server)
    async with aiohttp.ClientSession() as session:
        source = _source(session, xnat_server)
        first = await source.version(_ref())
        assert await source.version(_ref("data/archive/" + SCAN)) == first
        xnat_server.add_file("P1", "S1", "E1", "2", "DICOM", "4.dcm", b"new")
        assert await source.version(_ref()) != first
    assert xnat_server.requests["GET zip"] == 0 and xnat_server.requests["GET file"] == 0


async def test_login_failures_outages_and_missing_resources(xnat_server: Xnat) -> None:
    _arrange(xnat_server)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(SourceRefused, match="refused the login"):
            await _source(session, xnat_server, password="wrong").fetch(_ref(), Collect())
        xnat_server.fail_next(1)
        with pytest.raises(SourceUnavailable, match=r"xnat://xnat\.example/projects/P1.*503"):
            await _source(session, xnat_server).fetch(_ref(), Collect())
        with pytest.raises(SourceRefused, match="404"):
            await _source(session, xnat_server).fetch(
                _ref(SCAN.replace("DICOM", "NIFTI")), Collect()
            )
        with pytest.raises(SourceRefused, match="not an XNAT resource"):
            _source(session, xnat_server).canonical(_ref("projects/P1"))
        down = XnatSource(
            SourceConfig(
                tenant="t",
                match="xnat://x",
                username="u",
                base_url=f"http://127.0.0.1:{free_port()}",
            ),
            session,
        )
        with pytest.raises(SourceUnavailable, match=r"xnat://xnat\.example"):
            await down.fetch(_ref(), Collect())


async def test_an_alias_token_logs_in_like_a_user(xnat_server: Xnat) -> None:
    files = _arrange(xnat_server)
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{xnat_server.url}/data/services/tokens/issue?format=json",
            auth=None,
            headers={"Authorization": _basic(xnat_server.username, xnat_server.password)},
        ) as response:
            token = await response.json()
        sink = Collect()
        await _source(session, xnat_server, token["alias"], token["secret"]).fetch(_ref(), sink)
    assert sink.files == files


async def test_results_are_uploaded_to_a_new_resource(xnat_server: Xnat) -> None:
    _arrange(xnat_server)

    async def content(data: bytes) -> AsyncIterator[bytes]:
        yield data

    results = {"mask.nii": os.urandom(10_000), "report/summary.txt": b"ok"}
    files = [
        ResultFile(path=p, size=len(d), open=lambda d=d: content(d))  # type: ignore[misc]
        for p, d in results.items()
    ]
    ref = _ref("projects/P1/subjects/S1/experiments/E1/resources/SEG")
    async with aiohttp.ClientSession() as session:
        summary = await _source(session, xnat_server).upload(ref, files)
        assert "uploaded 2 files" in summary
        await _source(session, xnat_server).upload(ref, files[:1])  # the resource exists now
    assert xnat_server.files("P1", "S1", "E1", None, "SEG") == results


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_a_zip_that_inflates_past_its_listing_is_refused_in_bounded_steps(
    xnat_server: Xnat,
) -> None:
    """A zip bomb: 64 MiB of zeros packed into about 64 KiB, listed as 1 KiB."""
    xnat_server.add_file("P1", "S1", "E1", "2", "DICOM", "bomb.dcm", bytes(64 << 20))
    xnat_server.listed_sizes["bomb.dcm"] = 1024
    sizes: list[int] = []

    class Measure(Collect):
        async def put(self, path: str, chunks: AsyncIterator[bytes]) -> None:
            async for chunk in chunks:
                sizes.append(len(chunk))

    async with aiohttp.ClientSession() as session:
        with pytest.raises(SourceRefused, match="inflates past the 1024 bytes declared"):
            await _source(session, xnat_server).fetch(_ref(), Measure())
    assert sum(sizes) <= 1024  # refused at the first step past the bound, not after it


async def test_the_whole_archive_is_bounded_and_inflated_a_chunk_at_a_time() -> None:
    """Entries no listing names still count against the archive's total; each step of
    inflating yields at most 1 MiB, however well the data packs."""
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a/files/1.dcm", b"x" * 1000)
        archive.writestr("a/files/2.dcm", bytes(8 << 20))

    async def chunks() -> AsyncIterator[bytes]:
        yield packed.getvalue()

    steps = []
    async for _, content in entries(chunks()):
        steps += [len(chunk) async for chunk in content]
    assert sum(steps) == 1000 + (8 << 20) and max(steps) <= 1 << 20
    with pytest.raises(ZipError, match="the archive inflates past the 5000 bytes"):
        async for _, content in entries(chunks(), None, 5000):
            async for _ in content:
                pass
