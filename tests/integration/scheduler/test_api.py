"""The job API: authentication, validation, tenant isolation, idempotency, cancel."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from services.scheduler.api import JOBS, STORE
from services.scheduler.views import MAX_BATCH_JOBS
from shared.auth import Role
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import bearer, event_tap, eventually, make_token

JOB = {"name": "hello", "image": "medhive/busybox:1", "command": ["echo", "hi"]}


async def test_requests_without_a_valid_token_get_401_json(scheduler: TestClient) -> None:
    for headers in ({}, {"Authorization": "Basic x"}, bearer("mh_nonsense")):
        response = await scheduler.get("/v1/jobs", headers=headers)
        assert response.status == 401
        assert "token" in (await response.json())["error"]["detail"]
    assert (await scheduler.get("/healthz")).status == 200


async def test_bad_bodies_get_400_and_422_naming_the_problem(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "cardiology"))
    json_body = {**auth, "Content-Type": "application/json"}
    response = await scheduler.post("/v1/jobs", data=b"{nope", headers=json_body)
    assert response.status == 400
    assert "not valid JSON" in (await response.json())["error"]["detail"]

    response = await scheduler.post(
        "/v1/jobs", json={**JOB, "walltime_s": -5, "colour": "red"}, headers=auth
    )
    assert response.status == 422
    fields = {p["field"] for p in (await response.json())["error"]["problems"]}
    assert fields == {"walltime_s", "colour"}

    response = await scheduler.get("/v1/jobs?limit=zero", headers=auth)
    assert response.status == 400
    response = await scheduler.get("/v1/jobs?state=sleeping", headers=auth)
    assert response.status == 400
    response = await scheduler.get("/v1/nowhere", headers=auth)
    assert response.status == 404
    assert (await response.json())["error"]["status"] == 404


async def test_a_tenant_never_sees_another_tenants_job(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    alice = bearer(await make_token(mongo_settings, "cardiology"))
    bob = bearer(await make_token(mongo_settings, "oncology"))
    job = await (await scheduler.post("/v1/jobs", json=JOB, headers=alice)).json()

    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}/logs"),
        ("DELETE", f"/v1/jobs/{job['id']}"),
    ]:
        response = await scheduler.request(method, path, headers=bob)
        assert response.status == 404, (method, path)
        assert job["id"] in (await response.json())["error"]["detail"]
    listing = await (await scheduler.get("/v1/jobs", headers=bob)).json()
    assert listing["jobs"] == []
    own = await (await scheduler.get("/v1/jobs", headers=alice)).json()
    assert [j["id"] for j in own["jobs"]] == [job["id"]]


async def test_without_nodes_a_job_waits_queued_and_can_be_cancelled(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "cardiology"))
    job = await (await scheduler.post("/v1/jobs", json=JOB, headers=auth)).json()
    assert job["state"] == "queued"
    assert [h["state"] for h in job["history"]] == ["submitted", "queued"]

    response = await scheduler.delete(
        f"/v1/jobs/{job['id']}", json={"reason": "wrong study"}, headers=auth
    )
    assert response.status == 202
    body = await (await scheduler.get(f"/v1/jobs/{job['id']}", headers=auth)).json()
    assert body["state"] == "cancelled"
    assert body["history"][-1]["reason"] == "wrong study"
    response = await scheduler.delete(f"/v1/jobs/{job['id']}", headers=auth)
    assert response.status == 409


async def test_same_idempotency_key_returns_the_same_job_and_conflicts_on_change(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "cardiology"))
    spec = {**JOB, "idempotency_key": "ris-4711"}
    first = await scheduler.post("/v1/jobs", json=spec, headers=auth)
    again = await scheduler.post("/v1/jobs", json=spec, headers=auth)
    assert (first.status, again.status) == (201, 200)
    assert (await first.json())["id"] == (await again.json())["id"]
    changed = await scheduler.post("/v1/jobs", json={**spec, "name": "other"}, headers=auth)
    assert changed.status == 409
    # Another tenant may use the same key for its own job.
    other = bearer(await make_token(mongo_settings, "oncology"))
    assert (await scheduler.post("/v1/jobs", json=spec, headers=other)).status == 201


async def test_job_events_are_published_after_they_are_stored(
    scheduler: TestClient, mongo_settings: MongoSettings, amqp_settings: AmqpSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "cardiology", Role.user))
    async with event_tap(amqp_settings, ["job.#"]) as tap:
        job = await (await scheduler.post("/v1/jobs", json=JOB, headers=auth)).json()
        queued = await tap.wait_for(lambda m: m["type"] == "job.queued")
    assert queued["correlation_id"] == job["id"]
    assert queued["tenant"] == "cardiology"
    assert queued["payload"]["previous_state"] == "submitted"
    assert [m["type"] for m in tap.of_job(job["id"])] == ["job.submitted", "job.queued"]

    # Published messages leave the outbox with the job's next write, the last ones in
    # a batched write after it; then a sweep has nothing left to publish.
    async with event_tap(amqp_settings, ["job.cancelled"]) as tap:
        await scheduler.delete(f"/v1/jobs/{job['id']}", headers=auth)
        await tap.wait_for(lambda m: m["type"] == "job.cancelled")
    store = scheduler.app[STORE]

    async def outbox_emptied() -> bool:
        return not await store.with_outbox()

    await eventually(outbox_emptied)
    assert await scheduler.app[JOBS].relay.sweep(settled_s=0) == 0


async def test_a_batch_is_answered_job_by_job_as_single_submissions_would_be(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "cardiology"))
    earlier = {**JOB, "idempotency_key": "ris-1"}
    first = await (await scheduler.post("/v1/jobs", json=earlier, headers=auth)).json()
    batch = [
        {**JOB, "name": "new"},
        earlier,  # repeats the job above
        {**earlier, "name": "changed"},  # the same key for another description
        {**JOB, "idempotency_key": "ris-2"},
        {**JOB, "idempotency_key": "ris-2"},  # twice in one batch: one job
    ]
    response = await scheduler.post("/v1/jobs/batch", json={"jobs": batch}, headers=auth)
    assert response.status == 200
    results = (await response.json())["results"]
    assert [r["status"] for r in results] == [201, 200, 409, 201, 200]
    assert results[1]["job"]["id"] == first["id"]
    assert results[2]["job"] is None and first["id"] in results[2]["detail"]
    assert results[3]["job"]["id"] == results[4]["job"]["id"]
    listing = await (await scheduler.get("/v1/jobs", headers=auth)).json()
    assert len(listing["jobs"]) == 3

    # A bad description anywhere refuses the whole batch, naming where.
    bad = [JOB, {**JOB, "walltime_s": "3600"}]
    response = await scheduler.post("/v1/jobs/batch", json={"jobs": bad}, headers=auth)
    assert response.status == 422
    problems = (await response.json())["error"]["problems"]
    assert [p["field"] for p in problems] == ["jobs.1.walltime_s"]
    too_many = {"jobs": [JOB] * (MAX_BATCH_JOBS + 1)}
    response = await scheduler.post("/v1/jobs/batch", json=too_many, headers=auth)
    assert response.status == 422
    listing = await (await scheduler.get("/v1/jobs", headers=auth)).json()
    assert len(listing["jobs"]) == 3
