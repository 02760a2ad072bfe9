"""Container jobs on the real one-node Docker Swarm (`MEDHIVE_VMNODE_RUNTIME=swarm`),
through the real services as processes, with inputs from the datacache."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from tests.e2e.support import client, origin_of, spec, wait_state
from tests.helpers import host_listener
from tests.processes import Stack
from tests.swarm import nothing_left, remove_everything_of

pytestmark = pytest.mark.slow

#: Waits for the test to look at it (it touches /tmp/go), then reads, writes, probes.
GATED_PROBE = (
    "while [ ! -e /tmp/go ]; do sleep 0.05; done; "
    "sha256sum /data/scan/ct.bin | tee /outputs/sums.txt; "
    "(touch /data/scan/new 2>/dev/null && echo INPUTS=writable || echo INPUTS=readonly); "
    "(echo x | nc -w 2 172.17.0.1 $HOST_PORT && echo HOST=reached || echo HOST=unreachable); "
    "id -u"
)


@pytest.fixture
async def swarm_node(monkeypatch: pytest.MonkeyPatch, db_prefix: str) -> AsyncIterator[None]:
    """The stack's node agent runs the `swarm` runtime (the stack passes its environment
    on); once the stack has stopped, whatever Swarm objects its node left go."""
    monkeypatch.setenv("MEDHIVE_VMNODE_RUNTIME", "swarm")
    yield
    async with aiodocker.Docker() as docker:
        await remove_everything_of(docker, f"node-{db_prefix.rstrip('_')}")  # the stack's


@pytest.fixture
async def swarm_stack(swarm_node: None, stack: Stack) -> Stack:
    return stack


async def running_task(docker: aiodocker.Docker, job_id: str) -> tuple[dict[str, Any], str]:
    """The job's service and its task's container id, once the task runs."""
    async with asyncio.timeout(30):
        while True:
            found = await docker.services.list(filters={"label": [f"medhive.job_id={job_id}"]})
            if found:
                tasks = await docker.tasks.list(filters={"service": [found[0]["ID"]]})
                if tasks and tasks[0]["Status"]["State"] == "running":
                    return found[0], tasks[0]["Status"]["ContainerStatus"]["ContainerID"]
            await asyncio.sleep(0.1)


async def release(docker: aiodocker.Docker, container_id: str) -> None:
    gate = await docker.containers.container(container_id).exec(
        ["touch", "/tmp/go"], user="65534:65534"
    )
    await gate.start(detach=True)


async def test_a_job_with_inputs_runs_as_a_confined_swarm_service_and_its_results_come_back(
    swarm_stack: Stack, user_token: str, tmp_path: Path
) -> None:
    stack = swarm_stack
    data = os.urandom(1024 * 1024 + 7)
    sha = hashlib.sha256(data).hexdigest()
    async with (
        origin_of(stack, {"ct.bin": data}) as origin,
        host_listener() as (port, connections),
        aiodocker.Docker() as docker,
        client(stack, user_token) as api,
    ):
        job = await api.submit(
            spec(
                "on-swarm", "sh", "-c", GATED_PROBE,
                env={"HOST_PORT": str(port)},
                inputs=[{"name": "scan", "source": f"{origin.url}/ct.bin", "path": "/data/scan"}],
                outputs={"max_mb": 4},
            )
        )  # fmt: skip
        service, container_id = await running_task(docker, job["id"])
        template = service["Spec"]["TaskTemplate"]
        assert "ReplicatedJob" in service["Spec"]["Mode"]
        assert template["RestartPolicy"]["Condition"] == "none"
        assert template["ContainerSpec"]["ReadOnly"] is True
        container = await docker.containers.container(container_id).show()
        host = container["HostConfig"]
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
        assert container["Config"]["User"] == "65534:65534"
        assert host["PidsLimit"] == 256 and host["Memory"] == 256 << 20
        inputs = next(m for m in host["Mounts"] if m["Target"] == "/data/scan")
        assert inputs["ReadOnly"] is True
        assert Path(inputs["Source"]).is_relative_to(stack.work_dir), "staged on this node"
        await release(docker, container_id)

        done = await wait_state(api, job["id"])
        assert done["state"] == "succeeded", done["history"]
        stdout = (await api.logs(job["id"]))["stdout"]
        assert f"{sha}  /data/scan/ct.bin" in stdout
        assert "INPUTS=readonly" in stdout and "\n65534\n" in stdout
        assert "HOST=unreachable" in stdout and connections == []
        got = await api.download(job["id"], "sums.txt", tmp_path / "sums.txt")
        assert (tmp_path / "sums.txt").read_text() == f"{sha}  /data/scan/ct.bin\n"
        assert got == hashlib.sha256((tmp_path / "sums.txt").read_bytes()).hexdigest()
        await nothing_left(docker, stack.node_id)
    assert list(stack.work_dir.iterdir()) == []


async def test_walltime_and_cancel_end_swarm_jobs(swarm_stack: Stack, user_token: str) -> None:
    stack = swarm_stack
    async with client(stack, user_token) as api, aiodocker.Docker() as docker:
        too_long = await api.submit(spec("sleepy", "sleep", "600", walltime_s=3))
        cancelled = await api.submit(spec("to-cancel", "sleep", "600"))
        await wait_state(api, cancelled["id"], {"running"})
        await running_task(docker, cancelled["id"])  # a Swarm service, not a container
        await api.cancel(cancelled["id"])

        timed_out = await wait_state(api, too_long["id"])
        assert timed_out["state"] == "timed_out", timed_out["history"]
        gone = await wait_state(api, cancelled["id"])
        assert gone["state"] == "cancelled", gone["history"]
        assert gone["history"][-2]["state"] == "running"
        await nothing_left(docker, stack.node_id)


async def test_an_agent_killed_mid_job_adopts_its_swarm_job_on_restart(
    swarm_stack: Stack, user_token: str
) -> None:
    stack = swarm_stack
    gated = "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo released"
    async with client(stack, user_token) as api, aiodocker.Docker() as docker:
        job = await api.submit(spec("survivor", "sh", "-c", gated))
        await wait_state(api, job["id"], {"running"})
        _, container_id = await running_task(docker, job["id"])
        stack.kill("vmnode")
        await stack.restart("vmnode")
        async with asyncio.timeout(30):
            while "run_adopted" not in stack.log("vmnode"):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await release(docker, container_id)

        done = await wait_state(api, job["id"])
        assert done["state"] == "succeeded", done["history"]
        assert (await api.logs(job["id"]))["stdout"] == "released\n"
        await nothing_left(docker, stack.node_id)
