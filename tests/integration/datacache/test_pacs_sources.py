"""DICOMweb and DIMSE sources against a real PACS (Orthanc), with a synthetic study."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator

import aiohttp
import pydicom
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE

from services.datacache.retries import with_retries
from services.datacache.settings import DatacacheSettings
from services.datacache.sources.base import (
    ResultFile,
    SourceConfig,
    SourceError,
    SourceRef,
    SourceRefused,
    SourceUnavailable,
)
from services.datacache.sources.dicomweb import DicomWebSource
from services.datacache.sources.dimse import DimseSource
from services.datacache.sources.storescp import StorageReceiver
from tests.fixtures.orthanc import (
    MOVE_PORT,
    DicomStudy,
    Orthanc,
    dataset_bytes,
    make_instance,
    upload_study,
)
from tests.integration.datacache.support import Collect


def _web(
    session: aiohttp.ClientSession, pacs: Orthanc, password: str | None = None
) -> DicomWebSource:
    config = SourceConfig(
        tenant="t",
        match=f"dicomweb+http://{pacs.host}:{pacs.http_port}",
        username=pacs.username,
        password=SecretStr(password or pacs.password),
    )
    return DicomWebSource(config, session)


def _dimse(pacs: Orthanc, calling: str = "MEDHIVE") -> DimseSource:
    config = SourceConfig(
        tenant="t", match=f"dimse://{pacs.aet}@{pacs.host}:{pacs.dicom_port}", calling_aet=calling
    )
    return DimseSource(config, None)  # type: ignore[arg-type]


def _web_ref(pacs: Orthanc, study: str) -> SourceRef:
    return SourceRef(f"dicomweb+http://{pacs.host}:{pacs.http_port}/dicom-web/studies/{study}")


def _dimse_ref(pacs: Orthanc, study: str) -> SourceRef:
    return SourceRef(f"dimse://{pacs.aet}@{pacs.host}:{pacs.dicom_port}/studies/{study}")


def _by_sop(files: dict[str, bytes]) -> dict[str, str]:
    return {
        path.rsplit("/", 1)[1].removesuffix(".dcm"): hashlib.sha256(data).hexdigest()
        for path, data in files.items()
    }


async def test_dicomweb_fetches_every_instance_byte_for_byte(
    orthanc: Orthanc, dicom_study: DicomStudy
) -> None:
    async with aiohttp.ClientSession() as session:
        sink = Collect()
        await _web(session, orthanc).fetch(_web_ref(orthanc, dicom_study.study_uid), sink)
    assert _by_sop(sink.files) == dicom_study.sha256
    for path in sink.files:
        series, sop = path.removesuffix(".dcm").split("/")
        assert dicom_study.series_of[sop] == series


async def test_dimse_c_get_fetches_every_dataset_byte_for_byte(
    orthanc: Orthanc, dicom_study: DicomStudy
) -> None:
    """DIMSE carries datasets: each one is the PACS's byte for byte, behind our meta group."""
    sink = Collect()
    await _dimse(orthanc).fetch(_dimse_ref(orthanc, dicom_study.study_uid), sink)
    datasets = {path: dataset_bytes(data) for path, data in sink.files.items()}
    assert _by_sop(datasets) == dicom_study.dataset_sha256


async def test_versions_change_with_the_study_and_download_no_pixels(
    orthanc: Orthanc, dicom_study: DicomStudy
) -> None:
    async with aiohttp.ClientSession() as session:
        web, dimse = _web(session, orthanc), _dimse(orthanc)
        web_ref = _web_ref(orthanc, dicom_study.study_uid)
        dimse_ref = _dimse_ref(orthanc, dicom_study.study_uid)
        before = (await web.version(web_ref), await dimse.version(dimse_ref))
        stats_before = orthanc.json("/statistics")
        assert before[0] == before[1]  # the same instances, whichever way asked
        raw = make_instance(
            dicom_study.patient_id, dicom_study.study_uid, dicom_study.series_uids[0], 99
        )
        orthanc.request("POST", "/instances", raw)
        after = (await web.version(web_ref), await dimse.version(dimse_ref))
        assert after[0] != before[0] and after[1] != before[1]
        assert stats_before is not None


async def test_wrong_credentials_unknown_studies_and_unknown_aes_are_refused(
    orthanc: Orthanc, dicom_study: DicomStudy
) -> None:
    async with aiohttp.ClientSession() as session:
        ref = _web_ref(orthanc, dicom_study.study_uid)
        with pytest.raises(SourceRefused, match="401"):
            await _web(session, orthanc, password="wrong").fetch(ref, Collect())
        with pytest.raises(SourceRefused, match="no such study"):
            await _web(session, orthanc).version(_web_ref(orthanc, "1.2.3.4.5"))
    with pytest.raises(SourceRefused, match="no such study"):
        await _dimse(orthanc).version(_dimse_ref(orthanc, "1.2.3.4.5"))
    with pytest.raises(SourceRefused, match=r"aborted C-FIND; may calling AE 'STRANGER'"):
        await _dimse(orthanc, calling="STRANGER").version(
            _dimse_ref(orthanc, dicom_study.study_uid)
        )
    with pytest.raises(SourceRefused, match=r"aborted C-FIND; may calling AE 'STRANGER'"):
        await _dimse(orthanc, calling="STRANGER").fetch(
            _dimse_ref(orthanc, dicom_study.study_uid), Collect()
        )


async def test_an_unreachable_pacs_is_unavailable() -> None:
    gone = Orthanc(host="127.0.0.1", password="unused", http_port=1, dicom_port=1)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(SourceUnavailable, match="dicomweb"):
            await _web(session, gone).fetch(_web_ref(gone, "1.2.3"), Collect())
    with pytest.raises(SourceUnavailable, match="dimse"):
        await _dimse(gone).fetch(_dimse_ref(gone, "1.2.3"), Collect())


async def test_results_are_stored_in_the_pacs_by_stow_rs_and_c_store(orthanc: Orthanc) -> None:
    study = upload_study(orthanc, instances=1, series=1)
    files = []
    for number in (2, 3):
        raw = make_instance(study.patient_id, study.study_uid, study.series_uids[0], number)

        async def content(data: bytes = raw) -> AsyncIterator[bytes]:
            yield data

        files.append(ResultFile(path=f"seg{number}.dcm", size=len(raw), open=content))
    async with aiohttp.ClientSession() as session:
        summary = await _web(session, orthanc).upload(_web_ref(orthanc, study.study_uid), files[:1])
        assert "1 instances" in summary
    summary = await _dimse(orthanc).upload(_dimse_ref(orthanc, study.study_uid), files[1:])
    assert "1 instances" in summary
    found = orthanc.json(f"/dicom-web/studies/{study.study_uid}/instances")
    assert isinstance(found, list) and len(found) == 3

    async def not_dicom() -> AsyncIterator[bytes]:
        yield b"plain text"

    async with aiohttp.ClientSession() as session:
        with pytest.raises(SourceRefused, match="not a DICOM file"):
            await _web(session, orthanc).upload(
                _web_ref(orthanc, study.study_uid), [ResultFile("a.txt", 10, not_dicom)]
            )


async def test_dicomweb_keeps_compressed_instances_as_the_archive_holds_them(
    orthanc: Orthanc,
) -> None:
    """RLE and deflated series come byte for byte as Orthanc stores them, not
    transcoded to Explicit VR Little Endian (which a PACS does unless asked not to)."""
    study = upload_study(
        orthanc, instances=6, series=3,
        syntaxes=(RLELossless, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian),
    )  # fmt: skip
    async with aiohttp.ClientSession() as session:
        sink = Collect()
        await _web(session, orthanc).fetch(_web_ref(orthanc, study.study_uid), sink)
    assert _by_sop(sink.files) == study.sha256
    syntaxes = {
        str(pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID)
        for data in sink.files.values()
    }
    assert syntaxes == {RLELossless, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian}


async def test_a_wado_answer_cut_short_is_a_source_error_never_a_partial_study(
    orthanc: Orthanc, dicom_study: DicomStudy
) -> None:
    """A proxy in front of the PACS that passes one instance, then ends the answer; the
    next try, through the datacache's retry loop, gets the whole study."""
    cuts = 1  # answers still to cut short
    pacs = _web_ref(orthanc, dicom_study.study_uid)
    upstream_root = f"http://{orthanc.host}:{orthanc.http_port}"

    async def forward(request: web.Request) -> web.StreamResponse:
        async with aiohttp.ClientSession() as client:
            headers = {k: v for k, v in request.headers.items() if k in ("Accept", "Authorization")}
            async with client.get(upstream_root + request.path_qs, headers=headers) as answer:
                body = await answer.read()
                nonlocal cuts
                if "multipart" not in answer.headers.get("Content-Type", "") or cuts == 0:
                    kept = {"Content-Type": answer.headers.get("Content-Type", "text/plain")}
                    return web.Response(body=body, status=answer.status, headers=kept)
                cuts -= 1
                second = body.find(b"\r\n--", body.find(b"\r\n\r\n"))  # after the first part
                content_type = answer.headers["Content-Type"]
                response = web.StreamResponse(headers={"Content-Type": content_type})
                await response.prepare(request)
                await response.write(body[:second])
                return response  # ends without the other parts or a closing boundary

    app = web.Application()
    app.router.add_get("/{tail:.*}", forward)
    server = TestServer(app)
    await server.start_server()
    try:
        config = SourceConfig(
            tenant="t",
            match=f"dicomweb+http://127.0.0.1:{server.port}",
            username=orthanc.username,
            password=SecretStr(orthanc.password),
        )
        ref = SourceRef(pacs.uri.replace(f"{orthanc.host}:{orthanc.http_port}",
                                              f"127.0.0.1:{server.port}"))  # fmt: skip
        async with aiohttp.ClientSession() as session:
            with pytest.raises(SourceUnavailable, match=r"broke off after \d of 5 instances"):
                await DicomWebSource(config, session).fetch(ref, Collect())
            cuts = 1
            sinks: list[Collect] = []

            async def one_try() -> None:
                sinks.append(Collect())
                await DicomWebSource(config, session).fetch(ref, sinks[-1])

            await with_retries(DatacacheSettings(fetch_backoff_s=0.01), ref.uri, one_try)
            assert len(sinks) == 2  # cut short once, then whole
            assert _by_sop(sinks[-1].files) == dicom_study.sha256
    finally:
        await server.close()


def _syntaxes(files: dict[str, bytes]) -> dict[str, str]:
    """SOP instance UID -> the transfer syntax its file says it is in."""
    return {
        path.rsplit("/", 1)[1].removesuffix(".dcm"): str(
            pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID
        )
        for path, data in files.items()
    }


async def test_dimse_c_get_keeps_each_instance_in_the_syntax_the_archive_holds(
    orthanc: Orthanc,
) -> None:
    """Storage contexts are offered for every syntax, one context each: Orthanc sends
    each instance as it holds it, so no dataset is converted on the way."""
    study = upload_study(
        orthanc, instances=6, series=3,
        syntaxes=(RLELossless, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian),
    )  # fmt: skip
    sink = Collect()
    await _dimse(orthanc).fetch(_dimse_ref(orthanc, study.study_uid), sink)
    datasets = {path: dataset_bytes(data) for path, data in sink.files.items()}
    assert _by_sop(datasets) == study.dataset_sha256
    assert set(_syntaxes(sink.files).values()) == {
        RLELossless,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
    }


async def test_a_transfer_syntax_asked_for_is_the_archives_conversion(orthanc: Orthanc) -> None:
    """`transfer_syntax` on an input: the archive converts (over DICOMweb and DIMSE),
    and the pixels are those of the original; what it cannot make is refused, with why."""
    study = upload_study(orthanc, instances=2, series=1, syntaxes=(RLELossless,))
    originals = {
        sop: pydicom.dcmread(io.BytesIO(make_bytes)).pixel_array.tobytes()
        for sop, make_bytes in _orthanc_files(orthanc, study).items()
    }
    async with aiohttp.ClientSession() as session:
        web_ref = _web_ref(orthanc, study.study_uid)
        web_sink, dimse_sink = Collect(), Collect()
        converted = SourceRef(web_ref.uri, ExplicitVRLittleEndian)
        await _web(session, orthanc).fetch(converted, web_sink)
        dimse_ref = SourceRef(_dimse_ref(orthanc, study.study_uid).uri, ExplicitVRLittleEndian)
        await _dimse(orthanc).fetch(dimse_ref, dimse_sink)
        for sink in (web_sink, dimse_sink):
            assert set(_syntaxes(sink.files).values()) == {ExplicitVRLittleEndian}
            pixels = {
                path.rsplit("/", 1)[1].removesuffix(".dcm"):
                    pydicom.dcmread(io.BytesIO(data)).pixel_array.tobytes()
                for path, data in sink.files.items()
            }  # fmt: skip
            assert pixels == originals
        assert (
            _web(session, orthanc)
            .canonical(converted)
            .endswith(f"?transfer-syntax={ExplicitVRLittleEndian}")
        )  # a converted study is cached apart from the original
        jpeg2000 = "1.2.840.10008.1.2.4.90"  # Orthanc cannot encode it
        # Orthanc says so with a 500 (retried, then the input fails with these words).
        with pytest.raises(SourceError, match=r"answered HTTP 500: \{ \"HttpError\""):
            await _web(session, orthanc).fetch(SourceRef(web_ref.uri, jpeg2000), Collect())
    with pytest.raises(SourceRefused, match=rf"\?transfer-syntax={jpeg2000}: C-GET failed"):
        await _dimse(orthanc).fetch(SourceRef(dimse_ref.uri, jpeg2000), Collect())


def _orthanc_files(orthanc: Orthanc, study: DicomStudy) -> dict[str, bytes]:
    """SOP instance UID -> the file Orthanc serves for it."""
    files = {}
    for sop in study.sha256:
        ids = orthanc.request("POST", "/tools/lookup", sop.encode(), "text/plain")
        orthanc_id = json.loads(ids)[0]["ID"]
        files[sop] = orthanc.request("GET", f"/instances/{orthanc_id}/file")
    return files


async def test_dimse_c_move_sends_the_study_to_our_storage_scp_unconverted(
    orthanc: Orthanc,
) -> None:
    """For archives that allow only C-MOVE: Orthanc opens its own association to the
    datacache's storage SCP (the AE `MEDHIVE` it knows at port 11112), which accepts
    every syntax (of retired SOP classes too); it stores only the instances a retrieval
    under way expects."""
    retired_us = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
    study = upload_study(
        orthanc, instances=4, series=2,
        syntaxes=(RLELossless, DeflatedExplicitVRLittleEndian),
        sop_classes=(CTImageStorage, retired_us),
    )  # fmt: skip
    assert set(study.sop_class_of.values()) == {CTImageStorage, retired_us}
    receiver = StorageReceiver("0.0.0.0", MOVE_PORT)
    receiver.start()
    try:
        config = SourceConfig(
            tenant="t",
            match=f"dimse://{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}",
            retrieve="move",
        )
        sink = Collect()
        await DimseSource(config, None, receiver).fetch(  # type: ignore[arg-type]
            _dimse_ref(orthanc, study.study_uid), sink
        )
        datasets = {path: dataset_bytes(data) for path, data in sink.files.items()}
        assert _by_sop(datasets) == study.dataset_sha256
        assert set(_syntaxes(sink.files).values()) == {RLELossless, DeflatedExplicitVRLittleEndian}
        # An instance no retrieval asked for is refused, whoever sends it.
        intruder = pydicom.dcmread(
            io.BytesIO(make_instance("X", generate_uid(), generate_uid(), 1))
        )
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = await asyncio.to_thread(ae.associate, "127.0.0.1", receiver.port)
        assert assoc.is_established
        status = await asyncio.to_thread(assoc.send_c_store, intruder)
        assert status.Status == 0x0124  # refused: not authorised
        # An expected instance that cannot be read is refused too, and fails nothing else.
        kept: list[str] = []
        with receiver.expect({intruder.SOPInstanceUID}, lambda path, _: kept.append(path)) as it:
            del intruder.SeriesInstanceUID
            status = await asyncio.to_thread(assoc.send_c_store, intruder)
        assoc.release()
        assert status.Status == 0xC000  # cannot understand
        assert kept == [] and it.failure is None and not it.received
    finally:
        receiver.stop()
    with pytest.raises(SourceRefused, match="runs no storage SCP"):
        await DimseSource(config, None).fetch(  # type: ignore[arg-type]
            _dimse_ref(orthanc, study.study_uid), Collect()
        )
