"""Container jobs on another Swarm node, through the real services as processes.

The other node is a second Docker engine in a network namespace of its own, joined to
this machine's Swarm as a worker (`scripts/swarm-worker.sh`); the node agent runs on
the manager with `MEDHIVE_VMNODE_SWARM_CONSTRAINTS` naming the worker. A job's inputs
reach the worker only, in memory there, through the attempt's stager; its results come
back through its uploader; the workload itself has no network.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from services.vmnode.runtimes.docker import MIB
from services.vmnode.runtimes.swarm import SwarmRuntime
from services.vmnode.settings import NodeSettings
from tests.e2e.support import client, origin_of, spec, wait_state
from tests.processes import Stack
from tests.swarm import nothing_left, remove_everything_of

pytestmark = pytest.mark.slow

WORKER_SCRIPT = Path(__file__).parents[2] / "scripts" / "swarm-worker.sh"
#: The worker's engine, and the manager's address as the worker reaches it.
WORKER_ENGINE = "unix:///run/medhive-w1/docker.sock"
MANAGER_ADDRESS = "10.213.0.1"
ON_THE_WORKER = '["node.labels.medhive.test-worker==1"]'

#: Waits for the test to look at it (it touches /tmp/go), then reads, writes, probes.
GATED_PROBE = (
    "while [ ! -e /tmp/go ]; do sleep 0.05; done; "
    "sha256sum /data/scan/ct.bin | tee /outputs/sums.txt; "
    "echo more > '/outputs/a dir/b c.txt' 2>/dev/null || "
    "(mkdir -p '/outputs/a dir' && echo more > '/outputs/a dir/b c.txt'); "
    "(touch /data/scan/new 2>/dev/null && echo INPUTS=writable || echo INPUTS=readonly); "
    "(timeout 3 wget -q -O /dev/null $DATACACHE/healthz && echo NET=reached || echo NET=none); "
    "id -u"
)


@pytest.fixture(scope="module")
def swarm_worker() -> Iterator[str]:
    """The worker node for this module's tests; its Swarm node id."""
    started = subprocess.run(
        ["bash", str(WORKER_SCRIPT), "start"], check=True, capture_output=True, text=True
    )
    try:
        yield started.stdout.split()[-1]
    finally:
        subprocess.run(["bash", str(WORKER_SCRIPT), "stop"], check=False, capture_output=True)


@pytest.fixture
def on_the_worker(swarm_worker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stack's node agent sends every container job to the worker, and its
    datacache listens where the worker's tasks reach it (the stack passes its
    environment on)."""
    monkeypatch.setenv("MEDHIVE_VMNODE_RUNTIME", "swarm")
    monkeypatch.setenv("MEDHIVE_VMNODE_SWARM_CONSTRAINTS", ON_THE_WORKER)
    monkeypatch.setenv("MEDHIVE_DATACACHE_HOST", "0.0.0.0")


@pytest.fixture
async def remote_stack(on_the_worker: None, stack: Stack) -> AsyncIterator[Stack]:
    """The stack, its node agent told where the worker's tasks reach the datacache (a
    port the stack chose: the agent starts again with it)."""
    port = stack.env["MEDHIVE_DATACACHE_PORT"]
    stack.env["MEDHIVE_VMNODE_SWARM_DATACACHE_URL"] = f"http://{MANAGER_ADDRESS}:{port}"
    stack.stop("vmnode")
    await stack.start("vmnode")
    yield stack
    for name in list(stack.processes):
        stack.stop(name)
    async with aiodocker.Docker() as docker:
        await remove_everything_of(docker, stack.node_id)


async def running_task(docker: aiodocker.Docker, job_id: str) -> dict[str, Any]:
    """The job's workload task (not a stager's or uploader's), once it runs."""
    labels = {"label": [f"medhive.job_id={job_id}"]}
    async with asyncio.timeout(60):
        while True:
            for service in await docker.services.list(filters=labels):
                if "medhive.part" in service["Spec"]["Labels"]:
                    continue
                tasks = await docker.tasks.list(filters={"service": [service["ID"]]})
                if tasks and tasks[0]["Status"]["State"] == "running":
                    return {**tasks[0], "Service": service}
            await asyncio.sleep(0.1)  # Swarm has no task events


async def running_here(worker: aiodocker.Docker, job_id: str) -> list[str]:
    """Names of the containers of the job that run on the worker."""
    found = await worker.containers.list(
        filters=json.dumps({"label": [f"medhive.job_id={job_id}"], "status": ["running"]})
    )
    return [c["Names"][0] for c in found]


async def test_a_job_with_inputs_runs_on_another_swarm_node_and_its_results_come_back(
    remote_stack: Stack, swarm_worker: str, user_token: str, tmp_path: Path
) -> None:
    stack = remote_stack
    data = os.urandom(1024 * 1024 + 7)
    sha = hashlib.sha256(data).hexdigest()
    async with (
        origin_of(stack, {"ct.bin": data}) as origin,
        aiodocker.Docker() as docker,
        aiodocker.Docker(url=WORKER_ENGINE) as worker,
        client(stack, user_token) as api,
    ):
        datacache = stack.env["MEDHIVE_VMNODE_SWARM_DATACACHE_URL"]
        job = await api.submit(
            spec(
                "elsewhere", "sh", "-c", GATED_PROBE,
                env={"DATACACHE": datacache},
                inputs=[{"name": "scan", "source": f"{origin.url}/ct.bin", "path": "/data/scan"}],
                outputs={"max_mb": 4},
            )
        )  # fmt: skip
        task = await running_task(docker, job["id"])
        assert task["NodeID"] == swarm_worker, "the job runs on the worker"
        container = await worker.containers.container(
            task["Status"]["ContainerStatus"]["ContainerID"]
        ).show()
        host = container["HostConfig"]
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
        assert container["Config"]["User"] == "65534:65534"
        inputs = next(m for m in container["Mounts"] if m["Destination"] == "/data/scan")
        assert inputs["Type"] == "volume" and inputs["RW"] is False
        volume = await worker._query_json(f"volumes/{inputs['Name']}")
        assert volume["Options"]["type"] == "tmpfs", "the inputs are in the worker's memory"
        assert await running_here(docker, job["id"]) == [], "nothing of it runs on the manager"
        gate = await worker.containers.container(container["Id"]).exec(
            ["touch", "/tmp/go"], user="65534:65534"
        )
        await gate.start(detach=True)

        done = await wait_state(api, job["id"])
        assert done["state"] == "succeeded", done["history"]
        stdout = (await api.logs(job["id"]))["stdout"]
        assert f"{sha}  /data/scan/ct.bin" in stdout
        assert "INPUTS=readonly" in stdout and "NET=none" in stdout and "\n65534\n" in stdout
        got = await api.download(job["id"], "sums.txt", tmp_path / "sums.txt")
        assert (tmp_path / "sums.txt").read_text() == f"{sha}  /data/scan/ct.bin\n"
        assert got == hashlib.sha256((tmp_path / "sums.txt").read_bytes()).hexdigest()
        await api.download(job["id"], "a dir/b c.txt", tmp_path / "b.txt")
        assert (tmp_path / "b.txt").read_text() == "more\n"

        await nothing_left(docker, stack.node_id)
        secrets = await docker._query_json(
            "secrets", params={"filters": json.dumps({"label": [f"medhive.node={stack.node_id}"]})}
        )
        assert secrets == [], "the delegated token is gone from the Swarm"
        assert await running_here(worker, job["id"]) == [], "the stager let go of the inputs"
    assert not stack.work_dir.exists() or list(stack.work_dir.iterdir()) == []


async def test_cancel_and_walltime_end_jobs_on_another_swarm_node(
    remote_stack: Stack, user_token: str
) -> None:
    stack = remote_stack
    async with (
        origin_of(stack, {"in.bin": b"input"}) as origin,
        aiodocker.Docker() as docker,
        aiodocker.Docker(url=WORKER_ENGINE) as worker,
        client(stack, user_token) as api,
    ):
        # Results but no inputs: a stager holding only the results' volume.
        too_long = await api.submit(
            spec("sleepy", "sleep", "600", walltime_s=4, outputs={"max_mb": 1})
        )
        cancelled = await api.submit(
            spec(
                "to-cancel", "sleep", "600",
                inputs=[{"name": "in", "source": f"{origin.url}/in.bin", "path": "/data/in"}],
            )
        )  # fmt: skip
        await running_task(docker, cancelled["id"])
        await api.cancel(cancelled["id"])

        gone = await wait_state(api, cancelled["id"])
        assert gone["state"] == "cancelled", gone["history"]
        assert gone["history"][-2]["state"] == "running"
        timed_out = await wait_state(api, too_long["id"])
        assert timed_out["state"] == "timed_out", timed_out["history"]
        await nothing_left(docker, stack.node_id)
        for job in (too_long, cancelled):
            assert await running_here(worker, job["id"]) == []


async def test_an_agent_killed_mid_job_adopts_its_job_on_another_node(
    remote_stack: Stack, user_token: str, tmp_path: Path
) -> None:
    stack = remote_stack
    gated = "while [ ! -e /tmp/go ]; do sleep 0.05; done; cat /data/in/in.bin > /outputs/out.txt"
    async with (
        origin_of(stack, {"in.bin": b"input"}) as origin,
        aiodocker.Docker() as docker,
        aiodocker.Docker(url=WORKER_ENGINE) as worker,
        client(stack, user_token) as api,
    ):
        job = await api.submit(
            spec(
                "survivor", "sh", "-c", gated,
                inputs=[{"name": "in", "source": f"{origin.url}/in.bin", "path": "/data/in"}],
                outputs={"max_mb": 1},
            )
        )  # fmt: skip
        task = await running_task(docker, job["id"])
        stack.kill("vmnode")
        await stack.restart("vmnode")
        async with asyncio.timeout(30):
            while "run_adopted" not in stack.log("vmnode"):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        gate = await worker.containers.container(
            task["Status"]["ContainerStatus"]["ContainerID"]
        ).exec(["touch", "/tmp/go"], user="65534:65534")
        await gate.start(detach=True)

        done = await wait_state(api, job["id"])
        assert done["state"] == "succeeded", done["history"]
        await api.download(job["id"], "out.txt", tmp_path / "out.txt")
        assert (tmp_path / "out.txt").read_bytes() == b"input"
        await nothing_left(docker, stack.node_id)
        assert await running_here(worker, job["id"]) == []


async def test_the_agent_offers_what_the_swarm_nodes_of_its_jobs_have(swarm_worker: str) -> None:
    async with aiodocker.Docker() as docker:
        nodes = {n["ID"]: n["Description"]["Resources"] for n in await docker.nodes.list()}
    assert swarm_worker in nodes and len(nodes) == 2

    def offered_by(*ids: str) -> tuple[float, int]:
        return (
            sum(nodes[i]["NanoCPUs"] for i in ids) / 1e9,
            sum(nodes[i]["MemoryBytes"] for i in ids) // MIB,
        )

    cases = [
        (json.loads(ON_THE_WORKER), offered_by(swarm_worker)),
        (["node.platform.os==linux"], offered_by(*nodes)),  # both
        ([], offered_by(*(i for i in nodes if i != swarm_worker))),  # its own node
    ]
    for constraints, expected in cases:
        settings = NodeSettings.model_validate({"node_id": "n", "swarm_constraints": constraints})
        runtime = SwarmRuntime(settings)
        try:
            assert await runtime.capacity() == expected, constraints
        finally:
            await runtime.close()
    kept_back = NodeSettings.model_validate({"node_id": "n", "cpus": 1, "memory_mb": 512})
    runtime = SwarmRuntime(kept_back)
    try:
        assert await runtime.capacity() is None, "the settings say"
    finally:
        await runtime.close()
