"""The scheduler's side of the data path, with the datacache and the node played by the test.

A job with inputs goes `queued → staging`, asks for `data.stage`, waits for
`data.staged`, is placed, asks for `data.grant`, and only after `data.granted` is the
node sent `node.run`. Its end releases the data; a staging failure fails the job.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from shared.messages.data import (
    DataFailed,
    DataGranted,
    DataOutputs,
    DataProgress,
    DataStaged,
    DataUploaded,
    InputSpec,
    StagedFile,
    StagedInput,
)
from shared.messages.nodes import RunFinished, RunStarted
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import bearer, event_tap, eventually, make_token
from tests.integration.scheduler.support import pretend

JOB = {
    "name": "segment",
    "image": "medhive/busybox:1",
    "inputs": [{"name": "ct", "source": "https://data.example/ct.zip", "path": "/data/ct"}],
    "outputs": {"destination": "https://results.example/upload"},
}


def _of(job_id: str, type_: str) -> Any:
    return lambda m: m["type"] == type_ and m["payload"]["job_id"] == job_id


async def _job(scheduler: TestClient, auth: dict[str, str], job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = await (await scheduler.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    return body


async def test_inputs_are_staged_then_granted_before_the_node_gets_the_job(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "radiology"))
    async with (
        pretend(amqp_settings) as (bus, commands),
        event_tap(amqp_settings, ["job.*"]) as events,
    ):
        job = await (await scheduler.post("/v1/jobs", json=JOB, headers=auth)).json()
        job_id = job["id"]
        assert job["state"] == "staging"
        stage = await commands.wait_for(_of(job_id, "data.stage"))
        assert stage["tenant"] == "radiology"
        assert stage["payload"]["inputs"][0]["source"] == JOB["inputs"][0]["source"]

        await bus.emit(
            "data.progress",
            DataProgress(job_id=job_id, input="ct", files=3, bytes=1000),
            correlation_id=job_id,
        )
        # Nothing is placed while the inputs are not staged, though the node has room.
        await events.wait_for(lambda m: m["type"] == "job.staging")
        assert not [m for m in commands.messages if m["type"] in ("data.grant", "node.run")]

        staged = StagedInput(
            name="ct", path="/data/ct", source=JOB["inputs"][0]["source"], files=3, bytes=1000
        )
        await bus.emit(
            "data.staged",
            DataStaged(job_id=job_id, inputs=[staged], cached=0),
            correlation_id=job_id,
            tenant="radiology",
        )
        grant = await commands.wait_for(_of(job_id, "data.grant"))
        assert grant["payload"]["node_id"] == "n1"
        assert not [m for m in commands.messages if m["type"] == "node.run"]
        current = await _job(scheduler, auth, job_id)
        assert current["state"] == "dispatched"
        assert current["staging_progress"]["bytes"] == 1000
        assert current["staged_inputs"][0]["files"] == 3

        granted = DataGranted(
            job_id=job_id,
            attempt=1,
            node_id="n1",
            objects=3,
            expires_at=grant["payload"]["expires_at"],
        )
        await bus.emit("data.granted", granted, correlation_id=job_id)
        run = await commands.wait_for(_of(job_id, "node.run"))
        sent = [InputSpec.model_validate(item) for item in run["payload"]["spec"]["inputs"]]
        assert sent == [InputSpec.model_validate(item) for item in JOB["inputs"]]

        await bus.emit(
            "run.started",
            RunStarted(job_id=job_id, attempt=1, node_id="n1", workload_id="c1"),
            correlation_id=job_id,
        )
        await bus.emit(
            "run.finished",
            RunFinished(job_id=job_id, attempt=1, node_id="n1", outcome="succeeded", exit_code=0),
            correlation_id=job_id,
        )
        release = await commands.wait_for(_of(job_id, "data.release"))
        assert release["payload"]["upload_to"] == JOB["outputs"]["destination"]
        await events.wait_for(lambda m: m["type"] == "job.succeeded")
        states = [m["payload"]["state"] for m in events.of_job(job_id)]
        assert states == ["submitted", "queued", "staging", "dispatched", "running", "succeeded"]


@pytest.mark.parametrize("when", ["staging", "granting"])
async def test_a_data_failure_fails_the_job_with_its_reason(
    when: str, scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "radiology"))
    async with pretend(amqp_settings) as (bus, commands):
        job_id = (await (await scheduler.post("/v1/jobs", json=JOB, headers=auth)).json())["id"]
        await commands.wait_for(_of(job_id, "data.stage"))
        if when == "granting":
            staged = StagedInput(name="ct", path="/data/ct", source="x", files=1, bytes=1)
            await bus.emit(
                "data.staged",
                DataStaged(job_id=job_id, inputs=[staged], cached=1),
                correlation_id=job_id,
            )
            await commands.wait_for(_of(job_id, "data.grant"))
        reason = "input ct: https://data.example/ct.zip: unavailable after 5 tries"
        await bus.emit(
            "data.failed", DataFailed(job_id=job_id, reason=reason), correlation_id=job_id
        )
        await commands.wait_for(_of(job_id, "data.release"))
        job = await _job(scheduler, auth, job_id)
        assert job["state"] == "failed"
        assert job["history"][-1]["reason"] == reason
        assert not [m for m in commands.messages if m["type"] == "node.run"]


async def test_cancelling_a_staging_job_ends_it_and_releases_its_data(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "radiology"))
    async with pretend(amqp_settings) as (_, commands):
        job_id = (await (await scheduler.post("/v1/jobs", json=JOB, headers=auth)).json())["id"]
        await commands.wait_for(_of(job_id, "data.stage"))
        response = await scheduler.delete(f"/v1/jobs/{job_id}", headers=auth)
        assert (await response.json())["state"] == "cancelled"
        release = await commands.wait_for(_of(job_id, "data.release"))
        assert release["payload"]["upload_to"] is None


async def test_job_descriptions_with_bad_inputs_are_refused(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "radiology"))
    bad_paths = ["relative/path", "/tmp/x", "/outputs", "/data/../etc", "/"]
    for path in bad_paths:
        item = {"name": "a", "source": "https://x.example/a", "path": path}
        response = await scheduler.post("/v1/jobs", json={**JOB, "inputs": [item]}, headers=auth)
        assert response.status == 422, path
        problems = (await response.json())["error"]["problems"]
        assert problems[0]["field"] == "inputs.0.path"
    nested = [
        {"name": "a", "source": "https://x.example/a", "path": "/data"},
        {"name": "b", "source": "https://x.example/b", "path": "/data/b"},
    ]
    response = await scheduler.post("/v1/jobs", json={**JOB, "inputs": nested}, headers=auth)
    assert response.status == 422
    assert "overlap" in (await response.json())["error"]["problems"][0]["problem"]


async def test_outputs_are_listed_for_the_jobs_tenant_only(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "radiology"))
    other = bearer(await make_token(mongo_settings, "cardiology"))
    async with pretend(amqp_settings) as (bus, commands):
        job_id = (await (await scheduler.post("/v1/jobs", json=JOB, headers=auth)).json())["id"]
        await commands.wait_for(_of(job_id, "data.stage"))
        files = [StagedFile(path="mask.nii", sha256="a" * 64, size=12)]
        await bus.emit(
            "data.outputs",
            DataOutputs(job_id=job_id, attempt=1, files=files, bytes=12),
            correlation_id=job_id,
        )
        await bus.emit(
            "data.uploaded",
            DataUploaded(job_id=job_id, destination="https://r", ok=True, detail="uploaded 1 file"),
            correlation_id=job_id,
        )
        body: dict[str, Any] = {}

        async def recorded() -> bool:
            nonlocal body
            body = await (await scheduler.get(f"/v1/jobs/{job_id}/outputs", headers=auth)).json()
            return body["upload"] is not None and bool(body["files"])

        await eventually(recorded)
        assert body["files"] == [{"path": "mask.nii", "sha256": "a" * 64, "size": 12}]
        assert body["upload"]["ok"] is True
        history = (await _job(scheduler, auth, job_id))["history"]
        assert history[-1]["event"] == "data.uploaded"
        assert (await scheduler.get(f"/v1/jobs/{job_id}/outputs", headers=other)).status == 404
        response = await scheduler.get(f"/v1/jobs/{job_id}/outputs/mask.nii", headers=other)
        assert response.status == 404
