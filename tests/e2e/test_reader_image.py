"""The demo DICOM reader image (`medhive/dicom-reader:1`, images/dicom-reader/) as a job
runs it: a study staged from the real PACS over DICOMweb and a stray text file from an
HTTP source, read inside medhive's container confinement; every instance reported as
the archive holds it, in the log and in the summary the job leaves in its outputs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    generate_uid,
)

from tests.e2e.support import client, wait_state
from tests.fixtures.orthanc import Orthanc, add_instance, multi_frame_sop_class, upload_study
from tests.integration.datacache.http_origin import Origin, serve_origin
from tests.processes import Stack

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
READER_IMAGE = os.environ.get("MEDHIVE_READER_IMAGE", "medhive/dicom-reader:1")
#: What the reader must say of each transfer syntax (its name, and whether compressed).
SYNTAXES: dict[str, tuple[str, str]] = {
    JPEGBaseline8Bit: ("JPEG Baseline (Process 1)", "yes"),
    ExplicitVRLittleEndian: ("Explicit VR Little Endian", "no"),
    RLELossless: ("RLE Lossless", "yes"),
}
SOP_CLASSES: dict[str, str] = {
    CTImageStorage: "CT Image Storage",
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage:
        "Multi-frame Grayscale Word Secondary Capture Image Storage",
}  # fmt: skip
NOTES = b"Not an image: the referral letter that came with the study.\n"
#: One `key=value` of the reader's lines; a value with spaces is a JSON string.
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def fields(line: str) -> dict[str, str]:
    return {k: json.loads(v) if v.startswith('"') else v for k, v in FIELD.findall(line)}


@pytest.fixture(scope="module")
def reader_image() -> str:
    """The image as built from the reader in this tree: build-images.sh rebuilds it when
    the reader has changed since, and does nothing otherwise."""
    subprocess.run(["bash", "scripts/build-images.sh"], cwd=ROOT, check=True)
    return READER_IMAGE


async def test_the_reader_reports_each_instance_as_the_pacs_holds_it(
    stack: Stack, user_token: str, orthanc: Orthanc, reader_image: str, tmp_path: Path
) -> None:
    study = upload_study(
        orthanc, instances=4, series=2, syntaxes=(JPEGBaseline8Bit, ExplicitVRLittleEndian)
    )
    add_instance(orthanc, study, generate_uid(), 1, RLELossless,
                 multi_frame_sop_class(RLELossless), frames=3)  # fmt: skip
    web = f"dicomweb+http://{orthanc.host}:{orthanc.http_port}"
    async with serve_origin(Origin(files={"referral.txt": NOTES})) as origin:
        await stack.configure_sources(
            [
                {"tenant": "radiology", "match": web,
                 "username": orthanc.username, "password": orthanc.password},
                {"tenant": "radiology", "match": origin.url},
            ]
        )  # fmt: skip
        async with client(stack, user_token) as api:
            job = await api.submit(
                {
                    "name": "read-study",
                    "image": reader_image,
                    "command": ["dicom-reader", "/data", "/outputs"],
                    "inputs": [
                        {"name": "study", "source": f"{web}/dicom-web/studies/{study.study_uid}",
                         "path": "/data/study"},
                        {"name": "notes", "source": f"{origin.url}/referral.txt",
                         "path": "/data/notes"},
                    ],
                    "outputs": {"max_mb": 1},
                }
            )  # fmt: skip
            done = await wait_state(api, job["id"], within=120)
            assert done["state"] == "succeeded", done["history"]
            stdout = (await api.logs(job["id"]))["stdout"]
            listing = await api.outputs(job["id"])
            assert [item["path"] for item in listing["files"]] == ["summary.json"]
            target = tmp_path / "summary.json"
            arrived = await api.download(job["id"], "summary.json", target)
            assert arrived == listing["files"][0]["sha256"]

    lines = stdout.splitlines()
    files = [fields(line) for line in lines if line.startswith("path=")]
    assert [f["path"] for f in files] == sorted(f["path"] for f in files)
    assert len(files) == len(study.sha256) + 1
    # Each instance: its bytes as the PACS serves them, its syntax as the PACS stored it.
    seen = {
        f["SOPInstanceUID"]: (f["sha256"], f["TransferSyntax"], f["compressed"], f["SOPClass"],
                              f["SeriesInstanceUID"], f["PatientID"], f["StudyInstanceUID"],
                              f["Rows"], f["Columns"], f["NumberOfFrames"])
        for f in files if f["dicom"] == "yes"
    }  # fmt: skip
    frames = {sop: 1 if of == CTImageStorage else 3 for sop, of in study.sop_class_of.items()}
    assert seen == {
        sop: (study.sha256[sop], *SYNTAXES[study.syntax_of[sop]],
              SOP_CLASSES[study.sop_class_of[sop]], study.series_of[sop], study.patient_id,
              study.study_uid, "32", "32", str(frames[sop]))
        for sop in study.sha256
    }  # fmt: skip
    notes = hashlib.sha256(NOTES).hexdigest()
    assert [(f["path"], f["sha256"]) for f in files if f["dicom"] == "no"] == [
        ("notes/referral.txt", notes)
    ]
    series = {
        s["series"]: (int(s["instances"]), int(s["frames"]))
        for s in (fields(line) for line in lines if line.startswith("series="))
    }
    per_series = Counter(study.series_of.values())
    assert series == {
        uid: (count, sum(frames[sop] for sop, of in study.series_of.items() if of == uid))
        for uid, count in per_series.items()
    }
    assert lines[-2:] == [
        f"files={len(files)} dicom={len(study.sha256)} not_dicom=1 series={len(per_series)}",
        "summary=/outputs/summary.json",
    ]

    # The summary says the same of every file, with the UIDs of class and syntax.
    summary = json.loads(target.read_text())
    instances = [i for s in summary["series"] for i in s["instances"]]
    assert {i["SOPInstanceUID"]: (i["sha256"], i["TransferSyntaxUID"], i["SOPClassUID"],
                                  i["SeriesInstanceUID"], i["NumberOfFrames"])
            for i in instances} == {
        sop: (study.sha256[sop], study.syntax_of[sop], study.sop_class_of[sop],
              study.series_of[sop], frames[sop])
        for sop in study.sha256
    }  # fmt: skip
    assert {s["SeriesInstanceUID"]: len(s["instances"]) for s in summary["series"]} == dict(
        per_series
    )
    assert [(n["path"], n["sha256"]) for n in summary["not_dicom"]] == [
        ("notes/referral.txt", notes)
    ]
    assert {i["path"]: i["sha256"] for i in instances + summary["not_dicom"]} == {
        f["path"]: f["sha256"] for f in files
    }
