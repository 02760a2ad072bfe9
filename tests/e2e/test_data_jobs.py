"""Jobs with data: inputs staged by the datacache, read by the container, results back.

Every service is a real process; the source is a real HTTP server on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.support import client, origin_of, spec, wait_state
from tests.integration.datacache.http_origin import Origin, serve_origin
from tests.processes import Stack

pytestmark = pytest.mark.slow

READ_AND_WRITE = (
    "cd /data/scan && sha256sum ct.bin | tee /outputs/sums.txt && "
    "mkdir /outputs/seg && echo mask > /outputs/seg/mask.txt && "
    "(touch /data/scan/new 2>/dev/null && echo writable || echo read-only) && "
    "ls -ld /data/scan | cut -c1-10 && id -u"
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_a_job_reads_its_staged_input_and_its_results_come_back(
    stack: Stack, user_token: str, tmp_path: Path
) -> None:
    data = os.urandom(2 * 1024 * 1024 + 3)
    async with origin_of(stack, {"ct.bin": data}) as origin:
        job_file = tmp_path / "job.yaml"
        job_file.write_text(
            "name: segment\nimage: medhive/busybox:1\n"
            f"command: [sh, -c, '{READ_AND_WRITE}']\n"
            f"inputs: [{{name: scan, source: '{origin.url}/ct.bin', path: /data/scan}}]\n"
            "outputs: {max_mb: 8}\n"
        )
        env = {
            **os.environ,
            "MEDHIVE_API_URL": stack.api,
            "MEDHIVE_AUDIT_URL": stack.audit,
            "MEDHIVE_TOKEN": user_token,
        }
        cli = [sys.executable, "-m", "medhive"]
        follow = await asyncio.to_thread(
            subprocess.run,
            [*cli, "submit", str(job_file), "--follow"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert follow.returncode == 0, follow.stdout + follow.stderr
        job_id = follow.stdout.split()[1]
        shown = [
            line.split()[1]
            for line in follow.stdout.splitlines()
            if re.match(r"\d\d:\d\d:\d\d  ", line)
        ]
        assert shown == ["submitted", "queued", "staging", "dispatched", "running", "succeeded"]
        assert f"fetched {origin.url}/ct.bin: 1 files" in follow.stdout
        assert f"{_sha(data)}  ct.bin" in follow.stdout
        assert "read-only" in follow.stdout and "dr-x------" in follow.stdout
        assert "\n65534\n" in follow.stdout

        download = tmp_path / "results"
        got = await asyncio.to_thread(
            subprocess.run,
            [*cli, "outputs", job_id, "-o", str(download)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert got.returncode == 0, got.stdout + got.stderr
        assert (download / "sums.txt").read_text() == f"{_sha(data)}  ct.bin\n"
        assert (download / "seg" / "mask.txt").read_text() == "mask\n"
        # Nothing of the job stays on the node.
        assert list(stack.work_dir.iterdir()) == []

        # A second job on the same input starts without fetching it again.
        get_before, bytes_before = origin.requests["GET"], origin.body_bytes
        async with client(stack, user_token) as api:
            second = await api.submit(
                spec(
                    "again",
                    "sha256sum",
                    "/data/scan/ct.bin",
                    inputs=[
                        {"name": "scan", "source": f"{origin.url}/ct.bin", "path": "/data/scan"}
                    ],
                )
            )
            done = await wait_state(api, second["id"])
            assert done["state"] == "succeeded", done["history"]
            assert done["staged_inputs"][0]["bytes"] == len(data)
            logs = await api.logs(second["id"])
            assert _sha(data) in logs["stdout"]
            records, _ = await api.events({"job": job_id, "type": "data."})
        assert (origin.requests["GET"], origin.body_bytes) == (get_before, bytes_before)

    types = [r["type"] for r in records]
    for expected in (
        "data.stage",
        "data.fetched",
        "data.staged",
        "data.grant",
        "data.granted",
        "data.accessed",
        "data.release",
        "data.released",
        "data.outputs",
    ):
        assert expected in types, expected
    reads = [
        r
        for r in records
        if r["type"] == "data.accessed" and r["envelope"]["payload"]["operation"] == "read"
    ]
    assert reads[0]["envelope"]["payload"]["bytes"] == len(data)
    assert reads[0]["envelope"]["payload"]["node_id"] == stack.node_id

    # After the job its node can no longer read the input.
    async with aiohttp.ClientSession() as session:
        token = stack.envs["vmnode"]["MEDHIVE_VMNODE_DATACACHE_TOKEN"]
        url = f"{stack.datacache}/v1/jobs/{job_id}/objects/{_sha(data)}"
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 403
            assert "revoked" in (await response.json())["error"]["detail"]


async def test_a_job_whose_source_stays_down_fails_naming_the_source(
    stack: Stack, user_token: str
) -> None:
    async with serve_origin(Origin(files={"a": b"x"}, fail_next=1000)) as origin:
        await stack.configure_sources([{"tenant": "radiology", "match": origin.url}])
        async with client(stack, user_token) as api:
            job = await api.submit(
                spec(
                    "down",
                    "true",
                    inputs=[{"name": "a", "source": f"{origin.url}/a", "path": "/data/a"}],
                )
            )
            done = await wait_state(api, job["id"])
    assert done["state"] == "failed"
    assert f"{origin.url}/a" in done["history"][-1]["reason"]
    assert "unavailable after" in done["history"][-1]["reason"]
