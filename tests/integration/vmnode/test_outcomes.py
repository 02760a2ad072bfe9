"""How a run's end becomes its outcome and its reported output."""

from __future__ import annotations

import aiodocker

from services.vmnode.settings import NodeSettings
from shared.bus import Bus
from tests.integration.vmnode.conftest import (
    Events,
    containers_of,
    new_job,
    node_run,
    removed,
    running_agent,
    send_run,
    sh,
)


async def test_exit_zero_succeeds_with_stdout_captured(
    settings: NodeSettings, scheduler: Bus, events: Events, docker: aiodocker.Docker
) -> None:
    job = new_job()
    async with running_agent(settings):
        sent = await send_run(scheduler, settings.node_id, node_run(job, ["echo", "hello world"]))
        started = await events.wait_for("run.started", job)
        finished = await events.wait_for("run.finished", job)
        await removed(docker, started.payload["workload_id"])
        assert await containers_of(docker, settings.node_id, job) == []
    assert finished.payload == {
        "job_id": job,
        "attempt": 1,
        "node_id": settings.node_id,
        "outcome": "succeeded",
        "exit_code": 0,
        "oom_killed": False,
        "reason": None,
        "outputs": [],
    }
    assert events.output(job, "stdout") == {
        "job_id": job,
        "attempt": 1,
        "node_id": settings.node_id,
        "stream": "stdout",
        "data": "hello world\n",
        "truncated": False,
    }
    assert events.output(job, "stderr") is None, "an empty stream is not reported"
    for event in (started, finished):
        assert event.correlation_id == job and event.tenant == "t1"
        assert event.causation_id == str(sent.id)
    order = [e.type for e in events.seen if e.payload.get("job_id") == job]
    assert order == ["run.started", "run.output", "run.finished"]


async def test_nonzero_exit_fails_with_the_exit_code(
    settings: NodeSettings, scheduler: Bus, events: Events
) -> None:
    job = new_job()
    async with running_agent(settings):
        await send_run(scheduler, settings.node_id, node_run(job, sh("echo oops >&2; exit 3")))
        finished = await events.wait_for("run.finished", job)
    assert finished.payload["outcome"] == "failed"
    assert finished.payload["exit_code"] == 3
    assert finished.payload["oom_killed"] is False
    stderr = events.output(job, "stderr")
    assert stderr is not None and stderr["data"] == "oops\n"


async def test_missing_image_fails_at_once_naming_the_image(
    settings: NodeSettings, scheduler: Bus, events: Events, docker: aiodocker.Docker
) -> None:
    job = new_job()
    async with running_agent(settings):
        run = node_run(job, ["true"], image="medhive/absent:0")
        await send_run(scheduler, settings.node_id, run)
        finished = await events.wait_for("run.finished", job)
        assert await containers_of(docker, settings.node_id, job) == []
    assert finished.payload["outcome"] == "failed"
    assert finished.payload["reason"] == (
        f"image 'medhive/absent:0' is not present on node {settings.node_id} "
        "(medhive does not pull)"
    )
    assert events.of("run.started", job) == []
    images = {tag for image in await docker.images.list() for tag in image["RepoTags"] or []}
    assert "medhive/absent:0" not in images, "nothing was pulled"


async def test_memory_hog_is_oom_killed_and_fails(
    settings: NodeSettings, scheduler: Bus, events: Events
) -> None:
    job = new_job()
    async with running_agent(settings):
        # `tail` keeps the whole newline-free input in memory.
        hog = node_run(job, sh("head -c 300m /dev/zero | tail"), memory_mb=32)
        await send_run(scheduler, settings.node_id, hog)
        finished = await events.wait_for("run.finished", job)
    assert finished.payload["outcome"] == "failed"
    assert finished.payload["oom_killed"] is True
    assert finished.payload["exit_code"] == 137
    assert finished.payload["reason"] == "out of memory (limit 32 MiB)"


async def test_output_is_bounded_and_keeps_the_tail(
    settings: NodeSettings, scheduler: Bus, events: Events
) -> None:
    job = new_job()
    settings = settings.model_copy(update={"log_limit_bytes": 1024})
    async with running_agent(settings):
        await send_run(scheduler, settings.node_id, node_run(job, sh("seq 1 3000; echo END")))
        await events.wait_for("run.finished", job)
    stdout = events.output(job, "stdout")
    assert stdout is not None
    assert stdout["truncated"] is True
    assert len(stdout["data"].encode()) == 1024
    assert stdout["data"].endswith("2999\n3000\nEND\n")


async def test_output_that_would_grow_past_the_message_limit_keeps_a_shorter_tail(
    settings: NodeSettings, scheduler: Bus, events: Events
) -> None:
    """Control characters take six bytes each in JSON: 200 KiB of them would make a
    message the scheduler refuses, so less of the tail is sent."""
    job = new_job()
    script = "head -c 204800 /dev/zero; echo END"
    async with running_agent(settings):
        await send_run(scheduler, settings.node_id, node_run(job, sh(script)))
        await events.wait_for("run.finished", job)
    (report,) = [e for e in events.of("run.output", job)]
    assert len(report.model_dump_json()) < settings.amqp.max_message_bytes
    assert report.payload["truncated"] is True
    assert report.payload["data"].endswith("\0\0END\n")
