"""The libvirt runtime on libvirt's test driver: the whole API, no hypervisor.

libvirt accepts one event implementation per process, bound to one asyncio loop, so
this module runs on one loop and is the only one that opens libvirt in the test
process (the end-to-end tests run the node agent as its own process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import libvirt
import pytest

from services.vmnode.guestnet import GuestNetwork
from services.vmnode.runtimes import libvirt as libvirt_runtime
from services.vmnode.runtimes.base import ImageMissing, Mount, WorkloadGone
from services.vmnode.runtimes.libvirt import LibvirtRuntime
from services.vmnode.settings import NodeSettings
from shared.bus import Bus, NoReply
from shared.messages.catalog import COMMANDS
from shared.messages.jobs import JobSpec, NodeRun
from shared.settings import AmqpSettings

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEADLINE = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
URI = "test:///default"


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def settings(tmp_path: Path, node_id: str = "node-a") -> NodeSettings:
    return NodeSettings.model_validate(
        {
            "node_id": node_id,
            "libvirt_uri": URI,
            "vm_domain_type": "test",
            "vm_dir": str(tmp_path / "vms"),
        }
    )


def vm_run(image: Path, job_id: str, **extra: object) -> NodeRun:
    spec = JobSpec.model_validate(
        {"kind": "vm", "name": "guest", "image": str(image), "vm": {"kernel": str(image)}, **extra}
    )
    return NodeRun(job_id=job_id, attempt=1, tenant="t1", spec=spec, deadline=DEADLINE)


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[LibvirtRuntime]:
    runtime = LibvirtRuntime(settings(tmp_path), network=None)
    yield runtime
    for workload in await runtime.list_own():
        await runtime.remove(workload)
    await runtime.close()


async def test_a_vm_is_defined_started_stopped_and_removed(
    runtime: LibvirtRuntime, base_image: Path, tmp_path: Path
) -> None:
    data = tmp_path / "in" / "scan"
    data.mkdir(parents=True)
    (data / "a.txt").write_text("a")
    outputs = tmp_path / "out"
    outputs.mkdir()
    run = vm_run(base_image, "job-life", outputs={"max_mb": 8})
    mounts = [Mount(data, "/data/scan"), Mount(outputs, "/outputs", read_only=False)]

    workload = await runtime.prepare(run, mounts)
    assert (workload.state, workload.kind, workload.job_id) == ("created", "vm", "job-life")
    directory = tmp_path / "vms" / workload.id
    assert sorted(p.name for p in directory.iterdir()) == ["data.img", "data.iso", "root.qcow2"]
    again = await runtime.prepare(run, mounts)  # a redelivered node.run
    assert again.id == workload.id

    await runtime.start(workload)
    [listed] = await runtime.list_own()
    assert (listed.state, listed.deadline, listed.attempt) == ("running", DEADLINE, 1)

    await runtime.stop(workload, grace_s=5)
    info = await runtime.wait(workload)
    assert info.exit_code == 0  # the guest powered off when asked (ACPI)
    await runtime.export_outputs(workload, outputs)  # an empty outputs/ gives nothing
    assert list(outputs.iterdir()) == []

    await runtime.remove(workload)
    assert not directory.exists()
    assert await runtime.list_own() == []
    with pytest.raises(WorkloadGone):
        await runtime.wait(workload)


async def test_wait_wakes_on_the_lifecycle_event(
    runtime: LibvirtRuntime, base_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the poll out of the way, only the STOPPED event can end the wait.
    monkeypatch.setattr(libvirt_runtime, "POLL_S", 3600.0)
    workload = await runtime.prepare(vm_run(base_image, "job-event"))
    await runtime.start(workload)
    # The domain is destroyed only once wait() has seen it running (else wait() would
    # find it stopped at its first look, and the event would not be what ended it).
    looked, call = asyncio.Event(), runtime._call

    async def observed(fn: Any, *args: Any) -> Any:
        result = await call(fn, *args)
        if getattr(fn, "__name__", "") == "state":
            looked.set()
        return result

    monkeypatch.setattr(runtime, "_call", observed)
    waiting = asyncio.create_task(runtime.wait(workload))
    await asyncio.wait_for(looked.wait(), 30)
    other = await asyncio.to_thread(libvirt.open, URI)  # someone else destroys it
    await asyncio.to_thread(other.lookupByName(workload.id).destroy)
    info = await asyncio.wait_for(waiting, 30)
    assert info.exit_code == 137  # ended from outside the guest
    other.close()


async def test_a_restarted_agent_finds_only_its_own_domains(
    runtime: LibvirtRuntime, base_image: Path, tmp_path: Path
) -> None:
    mine = await runtime.prepare(vm_run(base_image, "job-mine"))
    await runtime.start(mine)
    other_node = LibvirtRuntime(settings(tmp_path, node_id="node-b"), network=None)
    theirs = await other_node.prepare(vm_run(base_image, "job-theirs"))

    successor = LibvirtRuntime(settings(tmp_path), network=None)
    found = await successor.list_own()
    assert [(w.id, w.job_id, w.state) for w in found] == [(mine.id, "job-mine", "running")]
    assert "test" not in [w.id for w in found]  # the driver's own domain is not medhive's
    await other_node.remove(theirs)
    await other_node.close()
    await successor.close()


async def test_a_missing_image_is_refused_before_anything_is_made(
    runtime: LibvirtRuntime, tmp_path: Path
) -> None:
    with pytest.raises(ImageMissing, match=r"/nowhere/base\.qcow2 is not on node node-a"):
        await runtime.prepare(vm_run(Path("/nowhere/base.qcow2"), "job-missing"))
    assert not (tmp_path / "vms").exists() or list((tmp_path / "vms").iterdir()) == []


async def test_only_a_vm_that_leased_an_address_asks_the_gateway_to_release_it(
    amqp_settings: AmqpSettings, base_image: Path, tmp_path: Path
) -> None:
    """A VM without interactive ports never had a lease: removing it sends netgw
    nothing, so its clean-up (the job's decrypted inputs among it) never waits for an
    answer that a node without netgw would not get. Every `net.*` command this node
    sends is seen on a queue of the test's own; a marker release sent after the
    removal must be the first one there."""
    bus = Bus(amqp_settings, "vmnode@test")
    await bus.connect()
    connection = await aio_pika.connect(amqp_settings.url.get_secret_value())
    try:
        seen = await (await connection.channel()).declare_queue(exclusive=True)
        await seen.bind(COMMANDS, "net.#")
        network = GuestNetwork(bus, "node-a", timeout_s=0.1)  # nobody answers here
        runtime = LibvirtRuntime(settings(tmp_path), network=network)
        workload = await runtime.prepare(vm_run(base_image, "job-no-ports"))
        await runtime.start(workload)
        await runtime.remove(workload)
        with contextlib.suppress(NoReply):
            await network.release("job-marker", 1, "t1", "marker")
        first = await seen.get(timeout=10)
        assert json.loads(first.body)["payload"]["job_id"] == "job-marker"
        await runtime.close()
    finally:
        await connection.close()
        await bus.close()
