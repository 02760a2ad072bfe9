"""A run's life beyond a plain exit: walltime, cancel, redelivery, agent restarts."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import aiodocker

from services.vmnode.settings import NodeSettings
from shared.bus import Bus
from shared.envelope import derived_id
from shared.messages.jobs import run_command_id
from tests.integration.vmnode.conftest import (
    GATED,
    Events,
    containers_of,
    new_job,
    node_run,
    release,
    removed,
    running_agent,
    send_cancel,
    send_run,
    sh,
)


async def test_walltime_stops_the_run_as_timed_out_and_removes_it(
    settings: NodeSettings, scheduler: Bus, events: Events, docker: aiodocker.Docker
) -> None:
    job = new_job()
    async with running_agent(settings):
        begun = time.monotonic()
        await send_run(scheduler, settings.node_id, node_run(job, ["sleep", "600"], walltime_s=2))
        started = await events.wait_for("run.started", job)
        finished = await events.wait_for("run.finished", job)
        took = time.monotonic() - begun
        await removed(docker, started.payload["workload_id"])
    assert finished.payload["outcome"] == "timed_out"
    assert finished.payload["reason"].startswith("walltime ended at ")
    assert 1.5 < took < 2 + settings.stop_grace_s + 3
    assert await containers_of(docker, settings.node_id, job) == []


async def test_cancel_stops_a_running_job_as_cancelled_and_removes_it(
    settings: NodeSettings, scheduler: Bus, events: Events, docker: aiodocker.Docker
) -> None:
    job = new_job()
    async with running_agent(settings):
        await send_run(scheduler, settings.node_id, node_run(job, ["sleep", "600"]))
        started = await events.wait_for("run.started", job)
        cancel = await send_cancel(scheduler, settings.node_id, job, "the user changed their mind")
        finished = await events.wait_for("run.finished", job)
        await removed(docker, started.payload["workload_id"])
    assert finished.payload["outcome"] == "cancelled"
    assert finished.payload["reason"] == "the user changed their mind"
    assert finished.causation_id == str(cancel.id)
    assert await containers_of(docker, settings.node_id, job) == []


async def test_a_run_delivered_twice_starts_one_container_announced_once(
    settings: NodeSettings, scheduler: Bus, events: Events, docker: aiodocker.Docker
) -> None:
    """The relay and an outbox sweep racing it publish the same `node.run` twice."""
    job = new_job()
    run = node_run(job, sh(GATED))
    envelope = scheduler.envelope(
        "node.run", run, id=run_command_id(job, 1), correlation_id=job, tenant=run.tenant
    )
    async with running_agent(settings):
        await asyncio.gather(*(scheduler.publish(envelope, node_id=settings.node_id)
                               for _ in range(2)))  # fmt: skip
        started = await events.wait_for("run.started", job)
        (container,) = await containers_of(docker, settings.node_id, job)
        assert started.payload["workload_id"] == container.id

        await release(docker, container.id)
        await events.wait_for("run.finished", job)
        # A redelivery after the end starts nothing new.
        await scheduler.publish(envelope, node_id=settings.node_id)
        await send_run(scheduler, settings.node_id, node_run("marker", ["true"]))
        await events.wait_for("run.finished", "marker")
    assert [e.id for e in events.of("run.started", job)] == [derived_id("run.started", job, 1)]
    assert started.causation_id == str(envelope.id)
    assert started.payload["started_at"] is not None
    assert started.occurred_at == datetime.fromisoformat(started.payload["started_at"])
    assert [f["outcome"] for f in events.finished(job)] == ["succeeded"]
    assert await containers_of(docker, settings.node_id, job) == []


async def test_restarted_agent_adopts_running_and_reports_exited_containers(
    settings: NodeSettings, scheduler: Bus, events: Events, docker: aiodocker.Docker
) -> None:
    adopted, exited = new_job(), new_job()
    async with running_agent(settings):
        await send_run(scheduler, settings.node_id, node_run(adopted, sh(GATED)))
        await send_run(scheduler, settings.node_id, node_run(exited, sh(f"{GATED}; exit 4")))
        adopted_id = (await events.wait_for("run.started", adopted)).payload["workload_id"]
        exited_id = (await events.wait_for("run.started", exited)).payload["workload_id"]
    await events.wait_for("node.offline")

    # No agent runs now: the workloads live on, and one of them ends meanwhile.
    assert (await docker.containers.container(adopted_id).show())["State"]["Running"]
    await release(docker, exited_id)
    assert (await docker.containers.container(exited_id).wait())["StatusCode"] == 4
    assert events.of("run.finished") == []

    async with running_agent(settings):
        await events.wait_for("node.online", where=lambda _: len(events.of("node.online")) == 2)
        finished = await events.wait_for("run.finished", exited)
        assert finished.payload["exit_code"] == 4 and finished.payload["outcome"] == "failed"
        stdout = events.output(exited, "stdout")
        assert stdout is not None and stdout["data"] == "released\n"

        # The one that ended unwatched is announced as started again, before its end,
        # as the same message: one id, one body, its container's own start time.
        repeats = events.of("run.started", exited)
        assert len(repeats) == 2 and repeats[0] == repeats[1]
        position = {id(e): i for i, e in enumerate(events.seen)}
        assert position[id(repeats[1])] < position[id(finished)]

        await release(docker, adopted_id)
        finished = await events.wait_for("run.finished", adopted)
        assert finished.payload["outcome"] == "succeeded"
        await removed(docker, adopted_id)
        await removed(docker, exited_id)
    assert len(events.finished(adopted)) == 1
    assert len(events.finished(exited)) == 1
    assert await containers_of(docker, settings.node_id) == []


async def test_adopted_run_past_its_deadline_is_timed_out(
    settings: NodeSettings, scheduler: Bus, events: Events, docker: aiodocker.Docker
) -> None:
    job = new_job()
    async with running_agent(settings):
        await send_run(scheduler, settings.node_id, node_run(job, ["sleep", "600"], walltime_s=1))
        await events.wait_for("run.started", job)
        # Stopping the agent detaches it before the deadline: nothing is reported.
    assert events.finished(job) == []
    async with running_agent(settings):
        finished = await events.wait_for("run.finished", job)
    assert finished.payload["outcome"] == "timed_out"


async def test_container_removed_behind_the_agents_back_is_reported_failed(
    settings: NodeSettings, scheduler: Bus, events: Events, docker: aiodocker.Docker
) -> None:
    job = new_job()
    async with running_agent(settings):
        await send_run(scheduler, settings.node_id, node_run(job, sh(GATED)))
        started = await events.wait_for("run.started", job)
        await docker.containers.container(started.payload["workload_id"]).delete(force=True)
        finished = await events.wait_for("run.finished", job)
    assert finished.payload["outcome"] == "failed"
    assert "disappeared" in finished.payload["reason"]
    assert events.of("run.output", job) == []
