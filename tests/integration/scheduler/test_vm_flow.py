"""The scheduler's side of VM jobs, with the nodes played by the test: a VM job goes only
to a node that runs VMs, and where to connect is kept and announced once per attempt."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from shared.envelope import utcnow
from shared.messages.nodes import NodeStatus, RunFinished, RunInteractive, RunStarted
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import bearer, event_tap, make_token
from tests.integration.scheduler.support import pretend

VM_JOB = {
    "kind": "vm",
    "name": "ecg",
    "image": "/images/ecg.qcow2",
    "vm": {"os": "windows", "interactive": [{"name": "rdp", "port": 3389}]},
}


async def test_a_vm_job_waits_for_a_node_that_runs_vms_and_announces_its_endpoints(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "cardio"))
    async with (
        pretend(amqp_settings, runtimes=("container",)) as (bus, commands),
        event_tap(amqp_settings, ["job.*"]) as events,
    ):
        job_id = (await (await scheduler.post("/v1/jobs", json=VM_JOB, headers=auth)).json())["id"]
        await events.wait_for(lambda m: m["type"] == "job.queued")
        assert not [m for m in commands.messages if m["type"] == "node.run"]

        vm_node = NodeStatus(node_id="n1", cpus=4, memory_mb=4096, runtimes=["container", "vm"],
                             heartbeat_s=30, started_at=utcnow())  # fmt: skip
        await bus.emit("node.online", vm_node)
        run = await commands.wait_for(lambda m: m["type"] == "node.run")
        assert run["payload"]["spec"]["vm"]["interactive"] == [{"name": "rdp", "port": 3389}]
        await bus.emit("run.started", RunStarted(job_id=job_id, attempt=1, node_id="n1",
                       workload_id="medhive-x-1"), correlation_id=job_id)  # fmt: skip
        await events.wait_for(lambda m: m["type"] == "job.running")

        endpoints = {"rdp": "192.0.2.10:40001"}
        stale = RunInteractive(job_id=job_id, attempt=0, node_id="n1", endpoints={"rdp": "x:1"})
        ready = RunInteractive(job_id=job_id, attempt=1, node_id="n1", endpoints=endpoints)
        for report in (stale, ready, ready):  # an older attempt's, then one repeated
            await bus.emit("run.interactive", report, correlation_id=job_id)
        announced = await events.wait_for(lambda m: m["type"] == "job.interactive_ready")
        assert announced["payload"] == {"job_id": job_id, "attempt": 1, "endpoints": endpoints}
        assert announced["tenant"] == "cardio"
        job: dict[str, Any] = await (await scheduler.get(f"/v1/jobs/{job_id}", headers=auth)).json()
        assert job["interactive"] == endpoints
        assert "connect to rdp 192.0.2.10:40001" in [h.get("reason") for h in job["history"]]

        await bus.emit("run.finished", RunFinished(job_id=job_id, attempt=1, node_id="n1",
                       outcome="succeeded", exit_code=0), correlation_id=job_id)  # fmt: skip
        await events.wait_for(lambda m: m["type"] == "job.succeeded")
        done = await (await scheduler.get(f"/v1/jobs/{job_id}", headers=auth)).json()
        assert "interactive" not in done  # the forward ended with the run
        assert [m["type"] for m in events.of_job(job_id)].count("job.interactive_ready") == 1
