"""The job files of examples/ run through the real services, each one loaded as a user
loads it, with only what differs on this machine put in: the source's host and port, its
credentials in the datacache's sources file (the entry the example's header shows), the
study UID, the VM's base image. Each test asserts what its example promises.

The VM examples are heavy (QEMU without KVM): the ISO one runs here, without the network
gateway it does not need; the disk and interactive ones are left to
tests/unit/test_examples.py and to tests/e2e/test_vm_jobs.py, which runs jobs like them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from medhive.client import Client
from tests.conftest import free_port
from tests.e2e.support import GUEST_DIR, URI, client, domains_of, spec, virsh, wait_state
from tests.fixtures.orthanc import DicomStudy, Orthanc
from tests.fixtures.xnat import Xnat
from tests.helpers import eventually
from tests.integration.datacache.http_origin import Origin, serve_origin
from tests.processes import Stack
from tests.unit.test_examples import EXAMPLES, load_example, sources_entries

pytestmark = pytest.mark.slow

#: The tenant of the `user_token` fixture.
TENANT = "radiology"
#: The study UID every DICOM example names, in place of a real one.
PLACEHOLDER_UID = "1.2.826.0.1.3680043.8.498.1"
#: The parts of an XNAT scan resource URI, as the stand-in's `add_file` takes them.
XNAT_SCAN = re.compile(
    r"^xnat://[^/]+/projects/(?P<project>[^/]+)/subjects/(?P<subject>[^/]+)"
    r"/experiments/(?P<experiment>[^/]+)/scans/(?P<scan>[^/]+)/resources/(?P<resource>[^/]+)$"
)


def swap(value: str, old: str, new: str) -> str:
    """`value` with `old` replaced, which must be there: an example that changed its
    placeholders fails here rather than run something else."""
    assert old in value, f"{old!r} is not in {value!r}: the example changed"
    return value.replace(old, new)


def with_source(job: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """The job with `old` replaced by `new` in its one input's source."""
    [item] = job["inputs"]
    return {**job, "inputs": [{**item, "source": swap(item["source"], old, new)}]}


async def configure(stack: Stack, example: str, **changes: str) -> None:
    """Give the datacache the sources-file entry the example's header shows, with what
    differs here (match, base_url, credentials) changed, for the test's tenant."""
    [entry] = sources_entries(example)
    for key in changes:
        assert key in entry, f"{example}: its sources-file entry has no {key!r}"
    await stack.configure_sources([{**entry, **changes, "tenant": TENANT}])


@contextlib.asynccontextmanager
async def example_origin(
    stack: Stack, example: str, files: dict[str, bytes] | None = None
) -> AsyncIterator[Origin]:
    """An HTTP server with `files`, behind a token, where the example's sources-file
    entry points (configured as in `configure`)."""
    async with serve_origin(Origin(files=files or {}, token="s3cret")) as origin:
        await configure(stack, example, match=origin.url, token="s3cret")
        yield origin


async def run(api: Client, job: dict[str, Any], within: float = 120) -> dict[str, Any]:
    """Submit the job and wait for its end; it must have succeeded."""
    job_id = (await api.submit(job))["id"]
    done = await wait_state(api, job_id, within=within)
    assert done["state"] == "succeeded", done["history"]
    return done


async def stdout(api: Client, job: dict[str, Any]) -> str:
    return str((await api.logs(job["id"]))["stdout"])


async def test_the_hello_example_runs_as_the_readme_shows(stack: Stack, user_token: str) -> None:
    """Submitted as the file it is, with the CLI, as scripts/demo.sh does."""
    env = {**os.environ, "MEDHIVE_API_URL": stack.api, "MEDHIVE_AUDIT_URL": stack.audit,
           "MEDHIVE_TOKEN": user_token}  # fmt: skip
    follow = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "medhive", "submit", str(EXAMPLES / "hello.yaml"), "--follow"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert follow.returncode == 0, follow.stdout + follow.stderr
    for line in (
        "hello from a medhive job",
        "user: 65534:65534",
        "network interfaces: lo",
        "CapEff:\t0000000000000000",
        "root filesystem: read-only",
        "tmpfs at /tmp",
        "exit code 0",
    ):
        assert line in follow.stdout, (line, follow.stdout)


async def test_the_retries_example_is_queued_again_when_its_node_is_lost(
    stack: Stack, user_token: str
) -> None:
    job = load_example("retries.yaml")
    async with client(stack, user_token) as api:
        job_id = (await api.submit(job))["id"]
        await wait_state(api, job_id, {"running"})
        stack.kill("vmnode")  # and it never comes back
        await stack.start(
            "vmnode-spare", "vmnode",
            MEDHIVE_VMNODE_NODE_ID=f"{stack.node_id}-large",  # removed after the test
            MEDHIVE_VMNODE_PORT=str(free_port()),
        )  # fmt: skip
        done = await wait_state(api, job_id, within=120)
        assert done["state"] == "succeeded", done["history"]
        assert done["attempt"] == 2 and done["node_id"] == f"{stack.node_id}-large"
        states = [h["state"] for h in done["history"]]
        assert states[states.index("lost") :] == [
            "lost", "queued", "dispatched", "running", "succeeded"
        ]  # fmt: skip
        assert f"retry 1 of {job['retries']}" in done["history"][states.index("lost") + 1]["reason"]
        assert "analysis done" in await stdout(api, done)


async def test_the_priority_example_overtakes_an_older_job_waiting_for_room(
    stack: Stack, user_token: str
) -> None:
    """The node (2 cpus) is full; an older job of priority 0 that needs the whole node
    waits before the example. When the node is free the example goes first, and the
    older job only once the example has left it room."""
    example = load_example("priority.yaml")
    assert example["priority"] > 0
    whole_node = {"cpus": 2, "memory_mb": 64}
    # Ends at once when cancelled: a shell as PID 1 ignores SIGTERM unless it traps it.
    hold = "trap 'exit 0' TERM; sleep 600 & wait"
    async with client(stack, user_token) as api:
        blocker = await api.submit(spec("blocker", "sh", "-c", hold, resources=whole_node))
        await wait_state(api, blocker["id"], {"running"})
        routine = await api.submit(spec("routine", "echo", "routine", resources=whole_node))
        urgent = await api.submit(example)
        for job in (routine, urgent):
            await wait_state(api, job["id"], {"queued"})
        await api.cancel(blocker["id"])
        urgent_done = await wait_state(api, urgent["id"])
        routine_done = await wait_state(api, routine["id"])
        assert (urgent_done["state"], routine_done["state"]) == ("succeeded", "succeeded")
        assert await stdout(api, urgent_done) == "urgent result ready\n"

    def dispatched(job: dict[str, Any]) -> datetime:
        return datetime.fromisoformat(
            next(h["at"] for h in job["history"] if h["state"] == "dispatched")
        )

    assert dispatched(urgent_done) < dispatched(routine_done)


async def test_the_http_input_example_reads_the_file_from_its_url(
    stack: Stack, user_token: str
) -> None:
    data = os.urandom(300_000)
    files = {"atlases/brain-atlas.nii.gz": data}
    async with example_origin(stack, "http-input.yaml", files) as origin:
        job = with_source(load_example("http-input.yaml"), "https://data.example", origin.url)
        async with client(stack, user_token) as api:
            done = await run(api, job)
            printed = (await stdout(api, done)).split()
    assert printed == [hashlib.sha256(data).hexdigest(), "brain-atlas.nii.gz", str(len(data))]
    assert origin.requests["GET"] == 1


async def test_the_outputs_example_uploads_its_results_to_the_destination(
    stack: Stack, user_token: str
) -> None:
    async with example_origin(stack, "outputs-destination.yaml") as origin:
        job = load_example("outputs-destination.yaml")
        destination = swap(job["outputs"]["destination"], "https://results.example", origin.url)
        job = {**job, "outputs": {**job["outputs"], "destination": destination}}
        async with client(stack, user_token) as api:
            done = await run(api, job)

            async def uploaded() -> bool:
                return (await api.outputs(done["id"]))["upload"] is not None

            await eventually(uploaded)
            listing = await api.outputs(done["id"])
    assert listing["upload"]["ok"], listing["upload"]
    assert [f["path"] for f in listing["files"]] == ["report/summary.txt"]
    assert origin.uploads == {"medhive/reports/report/summary.txt": b"findings: none\n"}


async def test_the_dicomweb_example_sees_every_instance_byte_for_byte(
    stack: Stack, user_token: str, orthanc: Orthanc, dicom_study: DicomStudy
) -> None:
    web = f"dicomweb+http://{orthanc.host}:{orthanc.http_port}"
    await configure(
        stack, "dicomweb.yaml", match=web, username=orthanc.username, password=orthanc.password
    )
    job = with_source(load_example("dicomweb.yaml"), "dicomweb+https://pacs.example", web)
    job = with_source(job, PLACEHOLDER_UID, dicom_study.study_uid)
    async with client(stack, user_token) as api:
        done = await run(api, job)
        lines = (await stdout(api, done)).splitlines()
    seen = {}
    for line in lines:
        digest, path = line.split()
        series, sop = path.removeprefix("./").removesuffix(".dcm").split("/")
        assert dicom_study.series_of[sop] == series
        seen[sop] = digest
    assert seen == dicom_study.sha256


async def test_the_dimse_example_lists_every_instance_of_the_study(
    stack: Stack, user_token: str, orthanc: Orthanc, dicom_study: DicomStudy
) -> None:
    peer = f"{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}"
    await configure(stack, "dimse.yaml", match=f"dimse://{peer}", calling_aet=orthanc.calling_aet)
    job = with_source(load_example("dimse.yaml"), "ORTHANC@pacs.example:4242", peer)
    job = with_source(job, PLACEHOLDER_UID, dicom_study.study_uid)
    async with client(stack, user_token) as api:
        done = await run(api, job)
        *listed, count = (await stdout(api, done)).splitlines()
    expected = sorted(f"./{series}/{sop}.dcm" for sop, series in dicom_study.series_of.items())
    assert listed == expected
    assert count == f"{len(expected)} instances"


async def test_the_xnat_example_reads_the_scan_resource(
    stack: Stack, user_token: str, xnat_server: Xnat
) -> None:
    """The example's URI stays as it is: its host is matched by the sources-file entry,
    whose `base_url` says where this XNAT really is."""
    job = load_example("xnat.yaml")
    scan = XNAT_SCAN.match(job["inputs"][0]["source"])
    assert scan is not None, "the example names a scan resource"
    files = {f"{n}.dcm": os.urandom(20_000 + n) for n in range(3)}
    for name, data in files.items():
        xnat_server.add_file(**scan.groupdict(), name=name, data=data)
    await configure(
        stack, "xnat.yaml", base_url=xnat_server.url,
        username=xnat_server.username, password=xnat_server.password,
    )  # fmt: skip
    async with client(stack, user_token) as api:
        done = await run(api, job)
        printed = (await stdout(api, done)).splitlines()
    assert printed == [
        f"{hashlib.sha256(data).hexdigest()}  ./{name}" for name, data in files.items()
    ]


@pytest.fixture
async def vm_node(stack: Stack, tmp_path: Path) -> AsyncIterator[Stack]:
    """The stack with a node agent that runs VMs, without a guest network (a VM job
    without interactive ports needs none, nor the network gateway)."""
    assert (GUEST_DIR / "vmlinuz").is_file(), "scripts/setup.sh builds the test guest"
    stack.stop("vmnode")
    await stack.start(
        "vmnode",
        MEDHIVE_VMNODE_LIBVIRT_URI=URI,
        MEDHIVE_VMNODE_VM_DIR=str(tmp_path / "vms"),
        MEDHIVE_VMNODE_VM_SHUTDOWN_GRACE_S="5",
    )
    try:
        yield stack
    finally:
        if "vmnode" in stack.processes:
            stack.stop("vmnode")
        for name in domains_of(stack.node_id):
            virsh("destroy", name)
            virsh("undefine", name)
        # A test that failed half-way may leave an attempt's tmpfs mounts (the agent
        # wipes them at its next start): pytest could not remove its directory past them.
        for mount in mounts_under(stack.work_dir):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)


def mounts_under(directory: Path) -> list[str]:
    with open("/proc/self/mounts") as table:
        points = [line.split()[1] for line in table]
    return [point for point in points if point.startswith(f"{directory}/")]


async def test_the_vm_iso_example_checksums_its_input_into_its_results(
    vm_node: Stack, user_token: str, tmp_path: Path
) -> None:
    base = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    data = os.urandom(200_000)
    async with example_origin(vm_node, "vm-iso.yaml", {"ecg/recording-0001.bin": data}) as origin:
        job = with_source(load_example("vm-iso.yaml"), "https://data.example", origin.url)
        vm = {
            **job["vm"],
            "kernel": swap(job["vm"]["kernel"], "/var/lib/medhive/guest", str(GUEST_DIR)),
            "initrd": swap(job["vm"]["initrd"], "/var/lib/medhive/guest", str(GUEST_DIR)),
        }
        job = {**job, "image": str(base), "vm": vm}
        async with client(vm_node, user_token) as api:
            done = await run(api, job, within=240)
            listing = await api.outputs(done["id"])
            target = tmp_path / "checksums.sha256"
            await api.download(done["id"], "checksums.sha256", target)
            console = await stdout(api, done)
    digest = hashlib.sha256(data).hexdigest()
    assert [f["path"] for f in listing["files"]] == ["checksums.sha256"]
    assert target.read_text() == f"{digest}  data/ecg/recording-0001.bin\n"
    assert f"medhive-guest: sha256 {digest}" in console  # the serial console is the log
    assert "medhive-guest: done" in console

    async def inputs_wiped() -> bool:
        return mounts_under(vm_node.work_dir) == []

    # The decrypted inputs go with the job: a VM without interactive ports leased no
    # address, so its clean-up does not wait on the network gateway (absent here).
    await eventually(inputs_wiped, within=10)
