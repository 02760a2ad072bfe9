"""Jobs that stage a study from a real PACS (Orthanc) over DICOMweb and over DIMSE; the
container sees every instance as the archive holds it, compressed or not, byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.e2e.support import client, spec, wait_state
from tests.fixtures.orthanc import (
    Orthanc,
    add_instance,
    dataset_bytes,
    multi_frame_sop_class,
    upload_study,
)
from tests.processes import Stack

pytestmark = pytest.mark.slow


async def test_jobs_stage_a_study_over_dicomweb_and_dimse(
    stack: Stack, user_token: str, orthanc: Orthanc, tmp_path: Path
) -> None:
    dicom_study = upload_study(
        orthanc, instances=8, series=4,
        syntaxes=(JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless, RLELossless),
    )  # fmt: skip
    add_instance(orthanc, dicom_study, generate_uid(), 1, JPEG2000Lossless,
                 multi_frame_sop_class(JPEG2000Lossless), frames=3)  # fmt: skip
    web = f"dicomweb+http://{orthanc.host}:{orthanc.http_port}"
    dimse = f"dimse://{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}"
    await stack.configure_sources(
        [
            {
                "tenant": "radiology",
                "match": web,
                "username": orthanc.username,
                "password": orthanc.password,
            },
            {"tenant": "radiology", "match": dimse, "calling_aet": orthanc.calling_aet},
        ]
    )
    study = dicom_study.study_uid
    async with client(stack, user_token) as api:
        over_web = await api.submit(
            spec(
                "dicomweb",
                "sh",
                "-c",
                "cd /data/study && find . -type f | sort | xargs sha256sum",
                inputs=[
                    {
                        "name": "study",
                        "source": f"{web}/dicom-web/studies/{study}",
                        "path": "/data/study",
                    }
                ],
            )
        )
        over_dimse = await api.submit(
            spec(
                "dimse",
                "sh",
                "-c",
                "cp -r /data/study/. /outputs/",
                inputs=[
                    {"name": "study", "source": f"{dimse}/studies/{study}", "path": "/data/study"}
                ],
                outputs={"max_mb": 16},
            )
        )
        done_web = await wait_state(api, over_web["id"], within=120)
        done_dimse = await wait_state(api, over_dimse["id"], within=120)
        assert done_web["state"] == "succeeded", done_web["history"]
        assert done_dimse["state"] == "succeeded", done_dimse["history"]
        printed = (await api.logs(over_web["id"]))["stdout"].splitlines()
        seen = {
            line.split()[1].rsplit("/", 1)[1].removesuffix(".dcm"): line.split()[0]
            for line in printed
        }
        assert seen == dicom_study.sha256

        listing = await api.outputs(over_dimse["id"])
        datasets = {}
        for item in listing["files"]:
            target = tmp_path / item["path"]
            assert await api.download(over_dimse["id"], item["path"], target) == item["sha256"]
            sop = item["path"].rsplit("/", 1)[1].removesuffix(".dcm")
            datasets[sop] = hashlib.sha256(dataset_bytes(target.read_bytes())).hexdigest()
        assert datasets == dicom_study.dataset_sha256
