"""xnatpy and pyxnat, XNAT's two common Python clients, against the XNAT stand-in: each
test drives a client through its own API, the way its users do, and checks what the
stand-in then holds or answers, so that a route that strays from XNAT's REST API as the
clients use it fails here. The clients are synchronous: they run in a thread, the
stand-in on the test's event loop.

xnatpy runs without its XSD-built data model (`no_parse_model`), which needs XNAT's
schema files; its REST calls are the model's. pyxnat asks for every listing as CSV.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import requests
import xnat
from pyxnat import Interface
from xnat.exceptions import XNATLoginFailedError
from xnat.session import BaseXNATSession

from tests.fixtures.xnat import Xnat

EXP = "/data/projects/P1/subjects/S1/experiments/E1"
SCAN = f"{EXP}/scans/2"
XNAT_NS = "{http://nrg.wustl.edu/xnat}"


def _arrange(server: Xnat) -> dict[str, bytes]:
    files = {"1.dcm": os.urandom(3000), "sub/3.dcm": os.urandom(500)}
    for name, data in files.items():
        server.add_file("P1", "S1", "E1", "2", "DICOM", name, data)
    server.add_file("P1", "S1", "E1", None, "NOTES", "notes.txt", b"seen")
    return files


@contextmanager
def _xnatpy(
    server: Xnat, user: str | None = None, password: str | None = None, **options: Any
) -> Iterator[BaseXNATSession]:
    with xnat.connect(
        server.url,
        user=user or server.username,
        password=password or server.password,
        no_parse_model=True,
        loglevel="ERROR",
        **options,
    ) as session:
        yield session


def _pyxnat(server: Xnat, user: str | None = None, password: str | None = None) -> Interface:
    return Interface(
        server=server.url, user=user or server.username, password=password or server.password
    )


def _rows(answer: Any) -> list[dict[str, Any]]:
    return list(answer["ResultSet"]["Result"])


def _status_with_cookie(server: Xnat, session: str) -> int:
    """What the stand-in answers a request that carries only this JSESSIONID."""
    answer = requests.get(
        f"{server.url}/data/projects?format=json", cookies={"JSESSIONID": session}, timeout=30
    )
    return answer.status_code


# -- listing and downloading -----------------------------------------------------------


async def test_xnatpy_lists_every_level_and_downloads(xnat_server: Xnat, tmp_path: Path) -> None:
    files = _arrange(xnat_server)
    exp_id = next(iter(xnat_server.experiments))

    def as_a_client() -> None:
        with _xnatpy(xnat_server) as session:
            assert [p["ID"] for p in _rows(session.get_json("/data/projects"))] == ["P1"]
            subjects = _rows(session.get_json("/data/projects/P1/subjects"))
            assert [s["label"] for s in subjects] == ["S1"]
            exps = _rows(session.get_json("/data/projects/P1/subjects/S1/experiments"))
            assert [(e["ID"], e["label"], e["xsiType"]) for e in exps] == [
                (exp_id, "E1", "xnat:mrSessionData")
            ]
            scans = _rows(session.get_json(f"/data/experiments/{exp_id}/scans"))
            assert [(s["ID"], s["type"]) for s in scans] == [("2", "T1")]
            resources = _rows(session.get_json(f"{SCAN}/resources"))
            assert [(r["label"], r["file_count"]) for r in resources] == [("DICOM", 2)]
            listing = _rows(session.get_json(f"{SCAN}/resources/DICOM/files"))
            # `Name` is the base name; the path is in `URI`, through the resource's ID.
            rid = resources[0]["xnat_abstractresource_id"]
            assert sorted(r["Name"] for r in listing) == ["1.dcm", "3.dcm"]
            for row in listing:
                prefix, _, path = row["URI"].partition(f"/resources/{rid}/files/")
                assert prefix == f"/data/projects/P1/subjects/S1/experiments/{exp_id}/scans/2"
                assert row["digest"] == hashlib.md5(files[path]).hexdigest()
                assert int(row["Size"]) == len(files[path])
                target = tmp_path / path.replace("/", "_")
                session.download(row["URI"], target, verbose=False)
                assert target.read_bytes() == files[path]
            session.download_zip(f"{SCAN}/resources/DICOM/files", tmp_path / "r.zip", verbose=False)
            document = session.get_json(EXP)["items"][0]
            assert document["data_fields"]["label"] == "E1"
            assert document["meta"]["xsi:type"] == "xnat:mrSessionData"

    await asyncio.to_thread(as_a_client)
    with zipfile.ZipFile(tmp_path / "r.zip") as archive:
        assert archive.read("E1/scans/2-T1/resources/DICOM/files/sub/3.dcm") == files["sub/3.dcm"]


async def test_pyxnat_lists_every_level_from_csv(xnat_server: Xnat, tmp_path: Path) -> None:
    """pyxnat turns every listing into `format=csv&columns=...`: a server that answered
    JSON would leave each of these lists empty (pyxnat swallows the parse error)."""
    files = _arrange(xnat_server)
    exp_id = next(iter(xnat_server.experiments))

    def as_a_client() -> list[str]:
        with _pyxnat(xnat_server) as central:
            assert central.select.projects().get() == ["P1"]
            project = central.select.project("P1")
            assert project.subjects().get() == ["S1"]
            experiment = project.subject("S1").experiment("E1")
            assert project.subject("S1").experiments().get() == [exp_id]
            assert (experiment.id(), experiment.label()) == (exp_id, "E1")
            assert experiment.scans().get() == ["2"]
            scan = experiment.scan("2")
            assert scan.exists() and not experiment.scan("9").exists()
            assert len(scan.resources().get()) == 1  # listed by numeric ID
            resource = scan.resource("DICOM")
            assert resource.files().get() == ["1.dcm", "3.dcm"]  # pyxnat names the last part
            assert resource.file("sub/3.dcm").exists()
            fetched = resource.file("sub/3.dcm").get(str(tmp_path / "3.dcm"))
            assert Path(fetched).read_bytes() == files["sub/3.dcm"]
            # the whole resource, as a zip pyxnat unpacks
            unpacked = resource.get(str(tmp_path), extract=True)
            # the experiment's XML document, which pyxnat's get() and xpath() read
            root = ElementTree.fromstring(experiment.get())
            assert (root.tag, root.get("label"), root.get("ID")) == (
                f"{XNAT_NS}MRSession",
                "E1",
                exp_id,
            )
            assert experiment.xpath("//xnat:scan/@ID") == ["2"]
            assert not project.subject("S1").experiment("E9").exists()
            # the columns a CSV listing carries are the ones asked for, and `URI`
            answer = central.get(f"{EXP.rsplit('/', 1)[0]}?format=csv&columns=ID,label")
            assert answer.text.splitlines() == [
                "ID,label,URI",
                f"{exp_id},E1,/data/experiments/{exp_id}",
            ]
            return sorted(unpacked)

    unpacked = await asyncio.to_thread(as_a_client)
    assert unpacked == [str(tmp_path / "DICOM" / name) for name in sorted(files)]
    for name, data in files.items():
        assert (tmp_path / "DICOM" / name).read_bytes() == data
    assert not xnat_server.sessions  # pyxnat's exit closed its session


# -- uploading -------------------------------------------------------------------------


async def test_xnatpy_uploads_to_a_scan_resource_and_reads_back(
    xnat_server: Xnat, tmp_path: Path
) -> None:
    """A resource is created (once: then 409); files arrive as xnatpy sends them: a raw
    octet-stream PUT, a multipart form, a tar.gz unpacked by `extract=true` (xnatpy's
    `upload_dir`); an existing file stays unless `overwrite=true`."""
    _arrange(xnat_server)
    local = tmp_path / "mask.nii"
    local.write_bytes(os.urandom(20_000))
    packed = io.BytesIO()
    with tarfile.open(mode="w:gz", fileobj=packed) as archive:
        for name, data in {"one.txt": b"1", "deep/two.txt": b"2"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    resource = f"{SCAN}/resources/SEG"

    def as_a_client() -> list[str]:
        with _xnatpy(xnat_server) as session:
            session.put(resource, format="NIFTI")
            session.put(resource, format="NIFTI", accepted_status=[409])
            session.upload_file(f"{resource}/files/mask.nii", local, verbose=False)
            kept = session.upload_string(f"{resource}/files/mask.nii", b"replacement")
            assert kept.json() == {"duplicates": ["mask.nii"]}
            session.upload_string(f"{resource}/files/note.txt", b"v1")
            session.upload_string(f"{resource}/files/note.txt", b"v2", overwrite=True)
            session.put(f"{resource}/files/form.txt", files={"file": ("local.txt", b"form")})
            session.put(f"{resource}/files", files={"file": ("named.txt", b"by part")})
            session.upload_stream(
                f"{resource}/files/upload.tar.gz",
                io.BytesIO(packed.getvalue()),
                query={"extract": "true"},
            )
            listing = _rows(session.get_json(f"{resource}/files"))
            (row,) = [r for r in listing if r["Name"] == "mask.nii"]
            session.download(row["URI"], tmp_path / "back.nii", verbose=False)
            resources = _rows(session.get_json(f"{SCAN}/resources"))
            assert [(r["label"], r["format"]) for r in resources] == [
                ("DICOM", ""),
                ("SEG", "NIFTI"),
            ]
            return sorted(r["URI"].partition("/files/")[2] for r in listing)

    paths = await asyncio.to_thread(as_a_client)
    stored = xnat_server.files("P1", "S1", "E1", "2", "SEG")
    assert stored == {
        "mask.nii": local.read_bytes(),
        "note.txt": b"v2",
        "form.txt": b"form",
        "named.txt": b"by part",
        "one.txt": b"1",
        "deep/two.txt": b"2",
    }
    assert paths == sorted(stored)
    assert (tmp_path / "back.nii").read_bytes() == local.read_bytes()


async def test_pyxnat_uploads_to_a_scan_resource_and_reads_back(
    xnat_server: Xnat, tmp_path: Path
) -> None:
    """pyxnat creates a missing resource with PUT, then POSTs each file `inbody=true` to
    the resource's numeric ID; `put_zip` sends a zip with `extract=true`."""
    _arrange(xnat_server)
    mask = tmp_path / "mask.nii"
    mask.write_bytes(os.urandom(10_000))
    newer = tmp_path / "newer.nii"
    newer.write_bytes(b"newer")
    bundle = tmp_path / "bundle.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.writestr("bundle/a.txt", b"a")
        archive.writestr("bundle/b/c.txt", b"c")

    def as_a_client() -> bytes:
        with _pyxnat(xnat_server) as central:
            scan = central.select.project("P1").subject("S1").experiment("E1").scan("2")
            resource = scan.resource("SEG")
            assert not resource.exists()
            resource.file("mask.nii").put(str(mask))
            assert resource.exists()
            resource.file("mask.nii").put(str(newer))  # kept: no overwrite
            resource.file("report.txt").put(str(newer))
            resource.file("report.txt").put(str(mask), overwrite=True)
            resource.put_zip(str(bundle), extract=True)
            resource.file("gone.txt").put(str(newer))
            resource.file("gone.txt").delete()
            assert not resource.file("gone.txt").exists()
            assert resource.file("bundle/b/c.txt").exists()
            assert resource.attributes()["file_count"] == "4"
            back = resource.file("mask.nii").get(str(tmp_path / "back.nii"))
            return Path(back).read_bytes()

    assert await asyncio.to_thread(as_a_client) == mask.read_bytes()
    assert xnat_server.files("P1", "S1", "E1", "2", "SEG") == {
        "mask.nii": mask.read_bytes(),
        "report.txt": mask.read_bytes(),
        "bundle/a.txt": b"a",
        "bundle/b/c.txt": b"c",
    }


# -- alias tokens ----------------------------------------------------------------------


async def test_an_alias_token_logs_both_clients_in(xnat_server: Xnat) -> None:
    """xnatpy issues the token (GET `/data/services/tokens/issue`); xnatpy recognises the
    alias as one and logs in with basic auth, pyxnat just uses it as user and password."""
    _arrange(xnat_server)

    def as_clients() -> None:
        with _xnatpy(xnat_server) as session:
            token = session.services.issue_token()
            valid = session.get_json(f"/data/services/tokens/validate/{token.alias}/{token.secret}")
            assert valid == {"valid": xnat_server.username}
        logins = xnat_server.requests["PUT auth"]
        with _xnatpy(xnat_server, token.alias, token.secret) as session:
            assert session.logged_in_user == xnat_server.username
            assert [p["ID"] for p in _rows(session.get_json("/data/projects"))] == ["P1"]
        assert xnat_server.requests["PUT auth"] == logins  # basic auth, not the login form
        with _pyxnat(xnat_server, token.alias, token.secret) as central:
            assert central.select.project("P1").subject("S1").experiments().get() == [
                next(iter(xnat_server.experiments))
            ]

    await asyncio.to_thread(as_clients)
    assert not xnat_server.sessions


async def test_a_wrong_or_invalidated_token_logs_neither_client_in(xnat_server: Xnat) -> None:
    _arrange(xnat_server)

    def as_clients() -> None:
        with _xnatpy(xnat_server) as session:
            token = session.services.issue_token()
            wrong = session.get_json(f"/data/services/tokens/validate/{token.alias}/nope")
            assert wrong == {"valid": None}
        with pytest.raises(XNATLoginFailedError), _xnatpy(xnat_server, token.alias, "nope"):
            pass
        with _xnatpy(xnat_server, token.alias, token.secret) as session:
            gone = session.get_json(f"/data/services/tokens/invalidate/{token.alias}")
            assert gone == {"result": "OK"}
        with pytest.raises(XNATLoginFailedError), _xnatpy(xnat_server, token.alias, token.secret):
            pass
        with _pyxnat(xnat_server, token.alias, token.secret) as central:
            assert central.select.projects().get() == []  # pyxnat swallows the 401
            assert central.get("/data/projects?format=csv").status_code == 401

    await asyncio.to_thread(as_clients)


# -- logging out -----------------------------------------------------------------------


async def test_xnatpy_logging_out_ends_its_session(xnat_server: Xnat) -> None:
    """xnatpy logs out with DELETE `/data/JSESSION`; its JSESSIONID, which worked until
    then (also to reconnect with, as xnatpy's CLI does), is refused afterwards."""
    _arrange(xnat_server)

    def as_a_client() -> str:
        with _xnatpy(xnat_server) as session:
            jsession = str(session.jsession)
            assert session.get("/data/JSESSION").text == jsession  # xnatpy's heartbeat
            assert _status_with_cookie(xnat_server, jsession) == 200
            with xnat.connect(
                xnat_server.url, jsession=jsession, no_parse_model=True, cli=True
            ) as again:
                assert again.logged_in_user == xnat_server.username
        assert _status_with_cookie(xnat_server, jsession) == 401
        with (
            pytest.raises(XNATLoginFailedError),
            xnat.connect(xnat_server.url, jsession=jsession, no_parse_model=True),
        ):
            pass
        return jsession

    jsession = await asyncio.to_thread(as_a_client)
    assert jsession not in xnat_server.sessions
    assert xnat_server.requests["DELETE JSESSION"] >= 1


async def test_pyxnat_logging_out_ends_its_session(xnat_server: Xnat) -> None:
    """pyxnat opens its session with basic auth on GET `/data/JSESSION` (whose answer is
    the cookie's value) and ends it with DELETE; it sends basic auth on every request,
    so it goes on working, in a new session, as with XNAT."""
    _arrange(xnat_server)

    def as_a_client() -> tuple[str, str]:
        with _pyxnat(xnat_server) as central:
            assert central.select.projects().get() == ["P1"]
            jsession = central._http.cookies["JSESSIONID"]
            assert central._exec("/data/JSESSION").decode() == jsession
            assert _status_with_cookie(xnat_server, jsession) == 200
            central.close_jsession()
            assert _status_with_cookie(xnat_server, jsession) == 401
            assert central.select.projects().get() == ["P1"]
            return jsession, central._http.cookies["JSESSIONID"]

    ended, renewed = await asyncio.to_thread(as_a_client)
    assert ended not in xnat_server.sessions and renewed != ended
