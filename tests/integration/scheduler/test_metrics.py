"""The scheduler's `/metrics`: jobs, queue, nodes and latencies from what placement keeps,
the consumers' counts, and who may read them."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from shared.auth import Role
from shared.messages.nodes import RunFinished, RunStarted
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import bearer, event_tap, make_token, publish_raw
from tests.integration.scheduler.support import pretend
from tests.scrape import scrape, scrape_until, status_of

JOB = {"name": "counted", "image": "medhive/busybox:1", "command": ["true"]}
#: More than node n1 (4 cpus) offers: it stays queued.
TOO_BIG = {**JOB, "name": "too-big", "resources": {"cpus": 8}}
COMMANDS = "scheduler.commands"


async def test_metrics_follow_a_job_through_placement_and_its_end(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    url = scheduler.make_url("/metrics")
    token = await make_token(mongo_settings, "_metrics", Role.metrics, name="prometheus")
    user = bearer(await make_token(mongo_settings, "radiology"))
    before = await scrape(url, token)
    assert before.value("medhive_scheduler_jobs") == 0
    assert before.value("medhive_scheduler_submit_to_dispatch_seconds_count") == 0

    async with (
        pretend(amqp_settings) as (bus, commands),
        event_tap(amqp_settings, ["job.*"]) as events,
    ):
        job_id = (await (await scheduler.post("/v1/jobs", json=JOB, headers=user)).json())["id"]
        waiting = (await (await scheduler.post("/v1/jobs", json=TOO_BIG, headers=user)).json())[
            "id"
        ]
        await commands.wait_for(lambda m: m["type"] == "node.run")
        started = RunStarted(job_id=job_id, attempt=1, node_id="n1", workload_id="c1")
        await bus.emit("run.started", started, correlation_id=job_id)
        await events.wait_for(lambda m: m["type"] == "job.running")

        running = await scrape(url, token)
        assert running.value("medhive_scheduler_jobs", state="running", tenant="radiology") == 1
        assert running.value("medhive_scheduler_jobs", state="queued", tenant="radiology") == 1
        assert running.value("medhive_scheduler_queued_jobs", tenant="radiology") == 1
        assert running.value("medhive_scheduler_node_online", node="n1") == 1
        assert running.value("medhive_scheduler_node_capacity_cpus", node="n1") == 4
        assert running.value("medhive_scheduler_node_reserved_cpus", node="n1") == 1
        assert running.value("medhive_scheduler_node_reserved_memory_bytes", node="n1") == (
            256 * 1024 * 1024
        )
        assert running.value("medhive_scheduler_submit_to_dispatch_seconds_count") == 1
        assert running.value("medhive_scheduler_dispatch_to_running_seconds_count") == 1
        assert running.value("medhive_scheduler_placement_pass_seconds_count") >= 1

        finished = RunFinished(job_id=job_id, attempt=1, node_id="n1", outcome="succeeded")
        await bus.emit("run.finished", finished, correlation_id=job_id)
        await events.wait_for(lambda m: m["type"] == "job.succeeded")
        await scheduler.delete(f"/v1/jobs/{waiting}", headers=user)
        await events.wait_for(lambda m: m["type"] == "job.cancelled")

    ended = await scrape_until(
        url,
        token,
        lambda s: s.value("medhive_messages_handled_total", type="run.finished", outcome="ok") == 1,
    )
    assert ended.value("medhive_scheduler_jobs") == 0
    assert ended.value("medhive_scheduler_queued_jobs", tenant="radiology") == 0
    assert ended.value("medhive_scheduler_node_reserved_cpus", node="n1") == 0
    assert ended.value("medhive_scheduler_jobs_ended_total", state="succeeded") == 1
    assert ended.value("medhive_scheduler_jobs_ended_total", state="cancelled") == 1
    assert ended.value("medhive_messages_handled_total", type="run.started", outcome="ok") == 1


async def test_rejected_commands_are_counted_as_dead_letters_by_their_known_type(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    url = scheduler.make_url("/metrics")
    token = await make_token(mongo_settings, "ops", Role.operator)  # an operator reads it too
    amqp_url = amqp_settings.url.get_secret_value()
    await publish_raw(amqp_url, b"{}", "job.submit", type="job.submit")  # no user_id
    await publish_raw(amqp_url, b"{}", "job.submit", type="made.up")

    counted = await scrape_until(url, token, lambda s: s.value("medhive_dead_letters_total") == 2)
    assert counted.value("medhive_dead_letters_total", queue=COMMANDS) == 2
    rejected = {"queue": COMMANDS, "outcome": "rejected"}
    assert counted.value("medhive_messages_handled_total", type="job.submit", **rejected) == 1
    assert counted.value("medhive_messages_handled_total", type="other", **rejected) == 1
    assert "made.up" not in {s.labels.get("type") for s in counted.samples}


async def test_metrics_need_a_metrics_or_operator_token_which_reads_nothing_else(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    url = scheduler.make_url("/metrics")
    metrics = bearer(await make_token(mongo_settings, "_metrics", Role.metrics))
    assert await status_of(url, {}) == 401
    assert await status_of(url, bearer(await make_token(mongo_settings, "radiology"))) == 403
    assert await status_of(url, metrics) == 200
    assert await status_of(scheduler.make_url("/v1/jobs"), metrics) == 403
    assert await status_of(scheduler.make_url("/v1/nodes"), metrics) == 403
