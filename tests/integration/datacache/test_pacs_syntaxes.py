"""What clinical archives hold, against a real PACS (Orthanc): each transfer syntax an
archive keeps images in, multi-frame instances, and studies of more (SOP class, syntax)
pairs than one DICOM association can negotiate."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import aiohttp
import numpy as np
import pytest
from pydantic import SecretStr
from pydicom import dcmread
from pydicom.encaps import generate_fragmented_frames
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    UncompressedTransferSyntaxes,
    generate_uid,
)

from services.datacache.sources.base import SourceConfig, SourceRef
from services.datacache.sources.dicomweb import DicomWebSource
from services.datacache.sources.dimse import DimseSource
from services.datacache.sources.storescp import StorageReceiver
from tests.fixtures.orthanc import (
    MANY_SOP_CLASSES,
    MOVE_PORT,
    DicomStudy,
    Orthanc,
    add_instance,
    dataset_bytes,
    multi_frame_sop_class,
    synthetic_pixels,
    upload_study,
)
from tests.integration.datacache.support import Collect

SYNTAXES = (
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEG2000Lossless,
)
FRAMES = 3


@pytest.fixture(scope="module")
def every_syntax(orthanc: Orthanc) -> tuple[DicomStudy, dict[str, tuple[str, int]]]:
    """Per syntax, a series of two CT images and a series of one multi-frame image; with
    what each SOP instance was made as: (transfer syntax, frames)."""
    study = upload_study(orthanc, 2 * len(SYNTAXES), len(SYNTAXES), SYNTAXES)
    made = {sop: (SYNTAXES[study.series_uids.index(s)], 1) for sop, s in study.series_of.items()}
    for syntax in SYNTAXES:
        sop_class = multi_frame_sop_class(syntax)
        sop = add_instance(orthanc, study, generate_uid(), 1, syntax, sop_class, FRAMES)
        made[sop] = (syntax, FRAMES)
    return study, made


def test_orthanc_keeps_each_syntax_and_each_instance_decodes_to_its_pixels(
    orthanc: Orthanc, every_syntax: tuple[DicomStudy, dict[str, tuple[str, int]]]
) -> None:
    study, made = every_syntax
    assert len(made) == 3 * len(SYNTAXES)
    assert study.syntax_of == {sop: syntax for sop, (syntax, _) in made.items()}
    for sop, (syntax, frames) in made.items():
        sop_class = CTImageStorage if frames == 1 else multi_frame_sop_class(syntax)
        assert study.sop_class_of[sop] == sop_class
        raw = orthanc.request("GET", f"/instances/{study.orthanc_id[sop]}/file")
        assert hashlib.sha256(raw).hexdigest() == study.sha256[sop]
        ds = dcmread(io.BytesIO(raw))
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert int(ds.get("NumberOfFrames", 1)) == frames
        if syntax not in UncompressedTransferSyntaxes:  # one fragment per frame
            fragments = list(generate_fragmented_frames(ds.PixelData, number_of_frames=frames))
            assert [len(frame) for frame in fragments] == [1] * frames, syntax
        decoded = ds.pixel_array.astype(np.int32)
        expected = synthetic_pixels(sop, syntax, frames).astype(np.int32)
        assert decoded.shape == expected.shape, syntax
        if syntax == JPEGBaseline8Bit:  # lossy: close, not equal
            assert ds.BitsAllocated == 8
            assert np.abs(decoded - expected).mean() < 4
            assert np.abs(decoded - expected).max() < 32
        else:
            assert np.array_equal(decoded, expected), syntax


async def test_dicomweb_stages_every_syntax_byte_for_byte(
    orthanc: Orthanc, every_syntax: tuple[DicomStudy, dict[str, tuple[str, int]]]
) -> None:
    """Compressed and multi-frame instances come as the archive holds them: no
    transcoding on the way, which a PACS does unless asked not to."""
    study, made = every_syntax
    async with aiohttp.ClientSession() as session:
        sink = Collect()
        await _web(session, orthanc).fetch(_web_ref(orthanc, study.study_uid), sink)
    staged = {
        path.rsplit("/", 1)[1].removesuffix(".dcm"): hashlib.sha256(data).hexdigest()
        for path, data in sink.files.items()
    }
    assert staged == study.sha256
    assert len(staged) == len(made)
    for path, data in sink.files.items():
        series, sop = path.removesuffix(".dcm").split("/")
        assert study.series_of[sop] == series
        meta = dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == made[sop][0]


async def test_a_study_of_more_class_syntax_pairs_than_one_association_offers(
    orthanc: Orthanc, many_classes: DicomStudy
) -> None:
    """52 image storage SOP classes in three syntaxes: 156 pairs, more than the 128
    presentation contexts of an association; the PACS takes and lists every instance."""
    study = many_classes
    pairs = {(study.sop_class_of[sop], study.syntax_of[sop]) for sop in study.sha256}
    assert len(pairs) == len(study.sha256) > 128
    assert {cls for cls, _ in pairs} == set(MANY_SOP_CLASSES)
    listed = orthanc.json(f"/dicom-web/studies/{study.study_uid}/instances?includefield=00080016")
    assert isinstance(listed, list)
    found = {(item["00080018"]["Value"][0], item["00080016"]["Value"][0]) for item in listed}
    assert found == set(study.sop_class_of.items())
    async with aiohttp.ClientSession() as session:
        version = await _web(session, orthanc).version(_web_ref(orthanc, study.study_uid))
    assert version is not None and version.startswith(f"{len(pairs)}:")


@pytest.mark.parametrize("retrieve", ["get", "move"])
async def test_dimse_stages_every_syntax_unconverted(
    orthanc: Orthanc,
    every_syntax: tuple[DicomStudy, dict[str, tuple[str, int]]],
    receiver: StorageReceiver,
    retrieve: str,
) -> None:
    """Over C-GET (our contexts) and C-MOVE (the PACS's): each dataset keeps the syntax
    the archive holds and equals the original, bytes and elements, pixel data included."""
    study, made = every_syntax
    sink = Collect()
    await _dimse(orthanc, receiver, retrieve).fetch(_dimse_ref(orthanc, study.study_uid), sink)
    assert len(sink.files) == len(made)
    for path, data in sink.files.items():
        series, sop = path.removesuffix(".dcm").split("/")
        assert study.series_of[sop] == series
        assert hashlib.sha256(dataset_bytes(data)).hexdigest() == study.dataset_sha256[sop]
        staged = dcmread(io.BytesIO(data))
        original = dcmread(
            io.BytesIO(orthanc.request("GET", f"/instances/{study.orthanc_id[sop]}/file"))
        )
        assert staged.file_meta.TransferSyntaxUID == made[sop][0]
        assert staged == original  # every element, PixelData included


async def test_dimse_c_get_stages_a_study_past_128_contexts(
    orthanc: Orthanc, many_classes: DicomStudy, receiver: StorageReceiver
) -> None:
    """C-GET spreads the (SOP class, syntax) contexts over as many associations as they
    need, each retrieving its instances by UID. (Over C-MOVE the PACS proposes, and
    Orthanc opens an association for each new pair: 156 of them, 25 s here; the
    C-MOVE tests use studies of a few classes, a retired one among them.)"""
    sink = Collect()
    await _dimse(orthanc, receiver, "get").fetch(_dimse_ref(orthanc, many_classes.study_uid), sink)
    staged = {
        path.rsplit("/", 1)[1].removesuffix(".dcm"): hashlib.sha256(dataset_bytes(data)).hexdigest()
        for path, data in sink.files.items()
    }
    assert staged == many_classes.dataset_sha256
    syntaxes = {
        path.rsplit("/", 1)[1].removesuffix(".dcm"): dcmread(
            io.BytesIO(data)
        ).file_meta.TransferSyntaxUID
        for path, data in sink.files.items()
    }
    assert syntaxes == many_classes.syntax_of


@pytest.fixture(scope="module")
def many_classes(orthanc: Orthanc) -> DicomStudy:
    syntaxes = (ExplicitVRLittleEndian, RLELossless, DeflatedExplicitVRLittleEndian)
    instances = len(syntaxes) * len(MANY_SOP_CLASSES)
    return upload_study(orthanc, instances, len(syntaxes), syntaxes, MANY_SOP_CLASSES)


@pytest.fixture(scope="module")
def receiver() -> Iterator[StorageReceiver]:
    """The datacache's storage SCP where Orthanc's configuration says the AE is."""
    scp = StorageReceiver("0.0.0.0", MOVE_PORT)
    scp.start()
    yield scp
    scp.stop()


def _dimse(pacs: Orthanc, receiver: StorageReceiver, retrieve: str) -> DimseSource:
    config = SourceConfig(
        tenant="t",
        match=f"dimse://{pacs.aet}@{pacs.host}:{pacs.dicom_port}",
        retrieve=retrieve,  # type: ignore[arg-type]
    )
    return DimseSource(config, None, receiver)  # type: ignore[arg-type]


def _dimse_ref(pacs: Orthanc, study: str) -> SourceRef:
    return SourceRef(f"dimse://{pacs.aet}@{pacs.host}:{pacs.dicom_port}/studies/{study}")


def _web(session: aiohttp.ClientSession, pacs: Orthanc) -> DicomWebSource:
    config = SourceConfig(
        tenant="t",
        match=f"dicomweb+http://{pacs.host}:{pacs.http_port}",
        username=pacs.username,
        password=SecretStr(pacs.password),
    )
    return DicomWebSource(config, session)


def _web_ref(pacs: Orthanc, study: str) -> SourceRef:
    return SourceRef(f"dicomweb+http://{pacs.host}:{pacs.http_port}/dicom-web/studies/{study}")
