"""A job that stages a scan resource from XNAT (the stand-in) and whose results go back to
a resource there."""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.e2e.support import client, spec, wait_state
from tests.fixtures.xnat import Xnat
from tests.helpers import eventually
from tests.processes import Stack

pytestmark = pytest.mark.slow


async def test_a_job_stages_from_xnat_and_uploads_its_results_there(
    stack: Stack, user_token: str, xnat_server: Xnat
) -> None:
    files = {f"{n}.dcm": os.urandom(50_000 + n) for n in range(4)}
    for name, data in files.items():
        xnat_server.add_file("P1", "S1", "E1", "2", "DICOM", name, data)
    await stack.configure_sources(
        [
            {
                "tenant": "radiology",
                "match": "xnat://xnat.example",
                "base_url": xnat_server.url,
                "username": xnat_server.username,
                "password": xnat_server.password,
            }
        ]
    )
    source = "xnat://xnat.example/projects/P1/subjects/S1/experiments/E1/scans/2/resources/DICOM"
    destination = "xnat://xnat.example/projects/P1/subjects/S1/experiments/E1/resources/SEG"
    async with client(stack, user_token) as api:
        job = await api.submit(
            spec(
                "from-xnat",
                "sh",
                "-c",
                "cd /data/scan && sha256sum *.dcm | tee /outputs/sums.txt",
                inputs=[{"name": "scan", "source": source, "path": "/data/scan"}],
                outputs={"destination": destination},
            )
        )
        done = await wait_state(api, job["id"], within=120)
        assert done["state"] == "succeeded", done["history"]
        printed = (await api.logs(job["id"]))["stdout"]
        for name, data in files.items():
            assert f"{hashlib.sha256(data).hexdigest()}  {name}" in printed

        async def uploaded() -> bool:
            return (await api.outputs(job["id"]))["upload"] is not None

        await eventually(uploaded)
        upload = (await api.outputs(job["id"]))["upload"]
        assert upload["ok"], upload
        history = (await api.job(job["id"]))["history"]
        assert history[-1]["event"] == "data.uploaded"
    assert xnat_server.files("P1", "S1", "E1", None, "SEG") == {"sums.txt": printed.encode()}
    assert xnat_server.requests["GET zip"] == 1
