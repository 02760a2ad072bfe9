"""The Swarm runtime against the real one-node Swarm of this machine (`docker swarm init`).

Each test has its own node id; every service, task container and network labelled with
it is removed afterwards, even when the test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from services.vmnode.runtimes.base import ImageMissing, Mount, Workload
from services.vmnode.runtimes.swarm import SwarmRuntime
from services.vmnode.settings import NodeSettings
from tests.helpers import host_listener
from tests.integration.vmnode.conftest import GATED, new_job, node_run, sh
from tests.swarm import nothing_left, remove_everything_of

#: What a task can see and do, printed from inside it (busybox `wget` crashes in the
#: test image: `nc` probes the network).
PROBE = """
cat /data/scan/ct.txt
if touch /data/scan/new 2>/dev/null; then echo INPUTS=writable; else echo INPUTS=readonly; fi
echo result > /outputs/result.txt
if echo x > /probe 2>/dev/null; then echo ROOTFS=writable; else echo ROOTFS=readonly; fi
if echo x > /tmp/probe; then echo TMP=writable; fi
echo "UID=$(id -u)"
grep CapEff /proc/self/status
echo "NETDEV $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' ')"
echo "ROUTES $(ip route | grep -c default)"
if echo ping | nc -w 2 "$HOST_IP" "$HOST_PORT"; then echo HOST=reached
else echo HOST=unreachable; fi
echo "PIDS=$(cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max)"
"""


@pytest.fixture
async def swarm(node_id: str, tmp_path: Path) -> AsyncIterator[SwarmRuntime]:
    """The runtime; afterwards every service, container and network of the node goes."""
    settings = NodeSettings(node_id=node_id, stop_grace_s=1.0, work_dir=tmp_path / "jobs")
    runtime = SwarmRuntime(settings)
    yield runtime
    await runtime.close()
    async with aiodocker.Docker() as docker:
        await remove_everything_of(docker, node_id)


async def task_container(docker: aiodocker.Docker, workload: Workload) -> dict[str, Any]:
    tasks = await docker.tasks.list(filters={"service": [workload.id]})
    container_id = tasks[0]["Status"]["ContainerStatus"]["ContainerID"]
    return dict(await docker.containers.container(container_id).show())


def inputs_dir(tmp_path: Path) -> list[Mount]:
    scan = tmp_path / "inputs" / "scan"
    scan.mkdir(parents=True)
    (scan / "ct.txt").write_text("voxels\n")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    os.chown(outputs, 65534, 65534)
    return [Mount(scan, "/data/scan"), Mount(outputs, "/outputs", read_only=False)]


async def test_a_job_runs_as_one_confined_swarm_task_with_its_data_and_no_network(
    swarm: SwarmRuntime, tmp_path: Path
) -> None:
    async with host_listener() as (port, connections):
        run = node_run(new_job(), sh(PROBE), memory_mb=48)
        run = run.model_copy(
            update={"spec": run.spec.model_copy(
                update={"env": {"HOST_IP": "172.17.0.1", "HOST_PORT": str(port)}}
            )}
        )  # fmt: skip
        mounts = inputs_dir(tmp_path)
        began = time.monotonic()
        async with asyncio.timeout(60):
            workload = await swarm.prepare(run, mounts)
            await swarm.start(workload)
            running = time.monotonic() - began
            info = await swarm.wait(workload)
            output = await swarm.output(workload, 64 * 1024)
        print(f"create to running {running:.2f} s, to exited {time.monotonic() - began:.2f} s")
    assert (info.exit_code, info.oom_killed, info.memory_limit_mb) == (0, False, 48)
    lines = output.stdout.splitlines()
    assert "voxels" in lines
    assert "INPUTS=readonly" in lines
    assert "ROOTFS=readonly" in lines and "TMP=writable" in lines
    assert "UID=65534" in lines
    assert "CapEff:\t0000000000000000" in lines
    assert "NETDEV eth0 lo " in lines, "lo and the job's own network, nothing else"
    assert "ROUTES 0" in lines, "no way out of that network"
    assert "HOST=unreachable" in lines and connections == []
    assert "PIDS=64" in lines
    assert (tmp_path / "outputs" / "result.txt").read_text() == "result\n"

    async with aiodocker.Docker() as docker:
        service = await docker.services.inspect(workload.id)
        spec = service["Spec"]
        task = spec["TaskTemplate"]
        assert spec["Mode"] == {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}}
        assert task["RestartPolicy"]["Condition"] == "none"
        assert spec["Labels"]["medhive.job_id"] == run.job_id
        assert spec["Labels"]["medhive.attempt"] == "1"
        own_node = (await docker.system.info())["Swarm"]["NodeID"]
        assert task["Placement"]["Constraints"] == [f"node.id=={own_node}"]
        limits = task["Resources"]["Limits"]
        assert limits == {"NanoCPUs": 500_000_000, "MemoryBytes": 48 << 20, "Pids": 64}
        # Swarm would count them for ever (see swarmspec): medhive's placement reserves.
        assert "Reservations" not in task["Resources"]
        [network] = task["Networks"]
        shown = await docker._query_json(f"networks/{network['Target']}")
        assert (shown["Driver"], shown["Internal"], shown["Attachable"]) == ("overlay", True, False)

        container = await task_container(docker, workload)
        host = container["HostConfig"]
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
        assert host["PidsLimit"] == 64 and host["Memory"] == 48 << 20
        assert host["NanoCpus"] == 500_000_000 and host["Init"] is True
        assert container["Config"]["User"] == "65534:65534"
        assert container["Config"]["Image"].startswith("sha256:"), "by id: never pulled"
        mounts_seen = {m["Target"]: m for m in host["Mounts"]}
        assert mounts_seen["/tmp"]["Type"] == "tmpfs"
        assert mounts_seen["/data/scan"]["ReadOnly"] is True
        assert mounts_seen["/outputs"].get("ReadOnly", False) is False

        await swarm.remove(workload)
        await nothing_left(docker, swarm.settings.node_id)


async def test_exit_code_and_out_of_memory_come_back(swarm: SwarmRuntime) -> None:
    failing = node_run(new_job(), sh("echo to stderr >&2; exit 3"))
    greedy = node_run(new_job(), sh("head -c 200m /dev/zero | tail > /dev/null"), memory_mb=32)

    async def run_to_end(run: Any) -> Any:
        workload = await swarm.prepare(run)
        await swarm.start(workload)
        return await swarm.wait(workload), await swarm.output(workload, 1024), workload

    async with asyncio.timeout(60):
        (failed, failed_output, _), (oom, _, _) = await asyncio.gather(
            run_to_end(failing), run_to_end(greedy)
        )
    assert (failed.exit_code, failed.oom_killed) == (3, False)
    assert failed_output.stderr == "to stderr\n"
    assert failed.finished_at is not None
    assert (oom.exit_code, oom.oom_killed, oom.memory_limit_mb) == (137, True, 32)


async def test_stop_ends_a_running_task_within_its_grace(swarm: SwarmRuntime) -> None:
    run = node_run(new_job(), ["sleep", "600"])
    async with asyncio.timeout(60):
        workload = await swarm.prepare(run)
        await swarm.start(workload)
        began = time.monotonic()
        await swarm.stop(workload, grace_s=1.0)
        info = await swarm.wait(workload)
    print(f"stop to exit {time.monotonic() - began:.2f} s")
    assert info.exit_code == 143, "SIGTERM, not SIGKILL: the workload got its chance"
    assert time.monotonic() - began < 5


async def test_stop_while_swarm_still_starts_the_task_leaves_nothing_running(
    swarm: SwarmRuntime,
) -> None:
    """Swarm does not stop a removed job service's task: stop must not rely on that."""
    run = node_run(new_job(), ["sleep", "600"])
    async with asyncio.timeout(60):
        workload = await swarm.prepare(run)
        await swarm.stop(workload, grace_s=1.0)  # at once: the task is not running yet
        info = await swarm.wait(workload)
    assert info.exit_code == 143
    async with aiodocker.Docker() as docker:
        running = await docker.containers.list(
            filters=json.dumps({"label": [f"com.docker.swarm.service.id={workload.id}"]})
        )
    assert running == []


async def test_a_restarted_agent_adopts_its_running_task_and_sweeps_what_a_crash_left(
    swarm: SwarmRuntime,
) -> None:
    run = node_run(new_job(), sh(GATED))
    async with asyncio.timeout(60):
        workload = await swarm.prepare(run)
        await swarm.start(workload)
        again = await swarm.prepare(run)  # a redelivered run makes no second task
        assert (again.id, again.state) == (workload.id, "running")
        await swarm.close()  # the agent dies; the task runs on

        successor = SwarmRuntime(swarm.settings)
        try:
            [adopted] = await successor.list_own()
            assert adopted.key == (run.job_id, 1) and adopted.state == "running"
            assert adopted.deadline == run.deadline
            async with aiodocker.Docker() as docker:
                container = await task_container(docker, workload)
                gate = await docker.containers.container(container["Id"]).exec(
                    ["touch", "/tmp/go"], user="65534:65534"
                )
                await gate.start(detach=True)
                assert (await successor.wait(adopted)).exit_code == 0
                assert (await successor.list_own())[0].state == "exited"

                # A crash between removing the service and the rest leaves both behind.
                await docker.services.delete(workload.id)
                assert await successor.list_own() == []
                await nothing_left(docker, swarm.settings.node_id)
        finally:
            await successor.close()


async def test_a_missing_image_is_refused_before_anything_is_made(swarm: SwarmRuntime) -> None:
    run = node_run(new_job(), ["true"], image="medhive/nothing:0")
    with pytest.raises(ImageMissing, match="medhive/nothing:0"):
        await swarm.prepare(run)
    async with aiodocker.Docker() as docker:
        await nothing_left(docker, swarm.settings.node_id)


async def test_finished_jobs_leave_the_node_capacity_for_the_next(swarm: SwarmRuntime) -> None:
    """Three whole-node jobs in a row on a two-core node: Swarm 20.10 would reject the
    third had the first two reserved their cores (see swarmspec)."""
    cpus = float(os.cpu_count() or 1)
    for _ in range(3):
        run = node_run(new_job(), ["true"])
        whole_node = run.spec.resources.model_copy(update={"cpus": cpus})
        run = run.model_copy(update={"spec": run.spec.model_copy(update={"resources": whole_node})})
        async with asyncio.timeout(30):
            workload = await swarm.prepare(run)
            await swarm.start(workload)
            assert (await swarm.wait(workload)).exit_code == 0
        await swarm.remove(workload)
