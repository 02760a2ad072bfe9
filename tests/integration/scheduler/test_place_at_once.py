"""A job that can run now is placed as it is stored: one insert holds it dispatched,
with every event of its way there and its node's command, and it overtakes no job that
a placement pass would have placed first (services/scheduler/placement.py,
`Placer.place_at_once`)."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from services.scheduler.app import PLACER, STORE
from services.scheduler.documents import JobDocument
from services.scheduler.placement import Room
from shared.auth import Role
from shared.envelope import utcnow
from shared.messages.jobs import JobSpec
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import bearer, event_tap, eventually, make_token
from tests.integration.scheduler.test_fair_share import JOB as SHAPE
from tests.integration.scheduler.test_fair_share import node, set_tenant

JOB = {**SHAPE, "name": "scan"}

WAY_THERE = ["submitted", "queued", "dispatched"]


async def test_a_job_that_can_run_now_is_stored_dispatched_in_one_write(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "radiology"))
    async with (
        node(amqp_settings, slots=2, hold_s=3600) as n1,
        event_tap(amqp_settings, ["job.*"]) as events,
    ):
        answer = await scheduler.post("/v1/jobs", json=JOB, headers=auth)
        job = await answer.json()
        assert (answer.status, job["state"], job["node_id"]) == (201, "dispatched", "n1")
        assert [entry["state"] for entry in job["history"]] == WAY_THERE
        assert await n1.until(1) == [("radiology", job["id"])]
        await events.wait_for(lambda m: m["type"] == "job.dispatched")
        assert [m["type"] for m in events.of_job(job["id"])] == [f"job.{s}" for s in WAY_THERE]
        stored = await scheduler.app[STORE].jobs.find_one({"_id": job["id"]})
        # Inserted so: the node's report that it started (which may be stored by now)
        # is the only write after the insert, and it adds its own history entry.
        assert stored["rev"] == len(stored["history"]) - len(WAY_THERE)
        assert scheduler.app[PLACER].view.in_use() == {"n1": Room(1.0, 256)}


async def test_a_repeated_submission_holds_no_second_room(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "radiology"))
    spec = {**JOB, "idempotency_key": "ris-1"}
    async with node(amqp_settings, slots=4, hold_s=3600):
        first = await scheduler.post("/v1/jobs", json=spec, headers=auth)
        again = await scheduler.post("/v1/jobs", json=spec, headers=auth)
        assert (first.status, again.status) == (201, 200)
        assert (await again.json())["id"] == (await first.json())["id"]
        placer = scheduler.app[PLACER]
        assert list(placer.view.holding) == [(await first.json())["id"]]
        assert placer.view.in_use() == {"n1": Room(1.0, 256)}


async def test_a_job_at_its_tenants_quota_queues_and_lets_another_tenant_pass(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    operator = await make_token(mongo_settings, "ops", Role.operator)
    await set_tenant(scheduler, operator, "quota", quota={"max_running_jobs": 1})
    limited = bearer(await make_token(mongo_settings, "quota"))
    other = bearer(await make_token(mongo_settings, "other"))
    async with node(amqp_settings, slots=4, hold_s=3600):
        running = await (await scheduler.post("/v1/jobs", json=JOB, headers=limited)).json()
        waiting = await (await scheduler.post("/v1/jobs", json=JOB, headers=limited)).json()
        # The waiting job fits the node but not its quota: a pass would not place it,
        # so it holds back nobody.
        passing = await (await scheduler.post("/v1/jobs", json=JOB, headers=other)).json()
    assert [job["state"] for job in (running, waiting, passing)] == [
        "dispatched", "queued", "dispatched"
    ]  # fmt: skip


async def test_a_new_job_does_not_overtake_a_waiting_one_that_could_run(
    scheduler: TestClient, amqp_settings: AmqpSettings
) -> None:
    placer = scheduler.app[PLACER]
    spec = JobSpec.model_validate(JOB)
    async with node(amqp_settings, slots=4, hold_s=3600):
        # A queued job that fits, as placement's view takes it in before a pass runs.
        waiting: JobDocument = {
            "_id": "j-waiting", "tenant": "radiology", "state": "queued", "rev": 0,
            "spec": spec.model_dump(mode="json"), "priority": 0, "created_at": utcnow(),
        }  # type: ignore[typeddict-item]  # fmt: skip
        placer.view.observe(waiting)

        async def node_online() -> bool:
            return "n1" in (await placer.free_capacity())[0]

        await eventually(node_online)
        assert await placer.place_at_once("j-new", "other", spec) is None
        placer.view.observe({**waiting, "state": "cancelled", "rev": 1})
        assert await placer.place_at_once("j-new", "other", spec) == "n1"
        assert "j-new" in placer.view.holding
        placer.view.let_go("j-new")  # never stored: its room comes back
        assert "j-new" not in placer.view.holding
