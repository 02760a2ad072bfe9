"""Jobs that stage a study from a real PACS (Orthanc) over DICOMweb and over DIMSE; the
container sees every instance byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.e2e.support import client, spec, wait_state
from tests.fixtures.orthanc import DicomStudy, Orthanc, dataset_bytes
from tests.processes import Stack

pytestmark = pytest.mark.slow


async def test_jobs_stage_a_study_over_dicomweb_and_dimse(
    stack: Stack, user_token: str, orthanc: Orthanc, dicom_study: DicomStudy, tmp_path: Path
) -> None:
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
