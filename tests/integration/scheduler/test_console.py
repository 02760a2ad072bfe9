"""The console's server side: its files, the audit passed through, and what the API
tells a console (who the token is, every tenant's jobs for operators, nodes' jobs)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.audit.api import STREAM_SLOTS, StreamSlots
from services.audit.app import create_app as create_audit
from services.audit.settings import AuditSettings
from services.scheduler.app import create_app
from services.scheduler.settings import SchedulerSettings
from shared.auth import Role
from shared.server import listen
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import bearer, eventually, make_token

JOB = {"name": "scan-42", "image": "medhive/busybox:1", "command": ["true"]}


@pytest.fixture
async def audit(
    amqp_settings: AmqpSettings, mongo_settings: MongoSettings, db_prefix: str
) -> AsyncIterator[TestServer]:
    settings = AuditSettings(amqp=amqp_settings, mongo=mongo_settings, database=f"{db_prefix}audit")
    server = TestServer(create_audit(settings))
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def console(
    scheduler_settings: SchedulerSettings, audit: TestServer
) -> AsyncIterator[aiohttp.ClientSession]:
    """The scheduler as it runs (`shared.server`, whose handlers a client that goes
    away does not cancel), its audit routes passed through to a real audit service."""
    settings = scheduler_settings.model_copy(update={"audit_url": str(audit.make_url(""))})
    listener = await listen(create_app(settings), "127.0.0.1", 0)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{listener.port}") as client:
        yield client
    await listener.close()


async def test_the_console_files_are_public_and_may_load_nothing_from_elsewhere(
    scheduler: TestClient,
) -> None:
    page = await scheduler.get("/ui", allow_redirects=False)
    assert (page.status, page.headers["Location"]) == (308, "/ui/")
    page = await scheduler.get("/ui/")
    assert page.status == 200
    assert page.content_type == "text/html"
    assert 'src="console.js"' in await page.text()
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    script = await scheduler.get("/ui/console.js")
    assert (script.status, script.content_type) == (200, "text/javascript")
    assert "sessionStorage" in await script.text()  # the token stays in the tab
    for missing in ("/ui/secrets.py", "/ui/..%2fapi.py", "/ui/console"):
        answer = await scheduler.get(missing)
        assert answer.status == 404
        assert (await answer.json())["error"]["status"] == 404


async def test_me_says_who_the_token_is(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    token = await make_token(mongo_settings, "radiology", Role.operator, name="ops-ann")
    answer = await scheduler.get("/v1/me", headers=bearer(token))
    assert await answer.json() == {"name": "ops-ann", "tenant": "radiology", "role": "operator"}


async def test_operators_list_and_read_every_tenants_jobs_and_users_only_their_own(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    alice = bearer(await make_token(mongo_settings, "cardiology"))
    bob = bearer(await make_token(mongo_settings, "oncology"))
    operator = bearer(await make_token(mongo_settings, "ops", Role.operator))
    made = {}
    for who, name in ((alice, "scan-1"), (alice, "report-1"), (bob, "scan-2")):
        job = await (
            await scheduler.post("/v1/jobs", json={**JOB, "name": name}, headers=who)
        ).json()
        made[name] = job["id"]

    async def names(headers: dict[str, str], query: str) -> list[str]:
        answer = await scheduler.get(f"/v1/jobs?{query}", headers=headers)
        assert answer.status == 200, await answer.text()
        return [job["name"] for job in (await answer.json())["jobs"]]

    assert await names(operator, "tenant=*") == ["scan-2", "report-1", "scan-1"]
    assert await names(operator, "tenant=*&name=scan") == ["scan-2", "scan-1"]
    assert await names(operator, "tenant=cardiology") == ["report-1", "scan-1"]
    assert await names(operator, "") == []  # its own tenant's, as before
    assert await names(alice, "name=scan") == ["scan-1"]
    assert await names(alice, "tenant=cardiology") == ["report-1", "scan-1"]
    # Regular-expression characters in a name are taken as they are.
    assert await names(alice, "name=.*") == []
    refused = await scheduler.get("/v1/jobs?tenant=oncology", headers=alice)
    assert refused.status == 403
    assert "own tenant" in (await refused.json())["error"]["detail"]
    assert (await scheduler.get("/v1/jobs?tenant=*", headers=alice)).status == 403

    # An operator reads another tenant's job, but not its logs, nor cancels it.
    job_id = made["scan-2"]
    assert (await scheduler.get(f"/v1/jobs/{job_id}", headers=operator)).status == 200
    assert (await scheduler.get(f"/v1/jobs/{job_id}/logs", headers=operator)).status == 404
    assert (await scheduler.delete(f"/v1/jobs/{job_id}", headers=operator)).status == 404
    assert (await scheduler.get(f"/v1/jobs/{job_id}", headers=alice)).status == 404


async def test_the_audit_is_read_through_the_scheduler_with_the_callers_own_rights(
    console: aiohttp.ClientSession,
    audit: TestServer,
    mongo_settings: MongoSettings,
    amqp_settings: AmqpSettings,
) -> None:
    user = bearer(await make_token(mongo_settings, "radiology"))
    other = bearer(await make_token(mongo_settings, "cardiology"))
    job = await (await console.post("/v1/jobs", json=JOB, headers=user)).json()

    async def records(headers: dict[str, str]) -> list[dict[str, Any]]:
        answer = await console.get(f"/v1/events?job={job['id']}", headers=headers)
        assert answer.status == 200
        found: list[dict[str, Any]] = (await answer.json())["events"]
        return found

    async def recorded() -> bool:
        return any(record["type"] == "job.queued" for record in await records(user))

    await eventually(recorded, within=10.0)
    seen = await records(user)
    assert {record["type"] for record in seen} >= {"job.queued"}
    assert await records(other) == []
    head = await (await console.get("/v1/events/head", headers=user)).json()
    assert head["seq"] >= seen[-1]["seq"]
    # The audit's own rule: verifying the chain is for operators.
    answer = await console.get("/v1/audit/verify", headers=user)
    assert answer.status == 403
    assert "operator" in (await answer.json())["error"]["detail"]


async def test_a_stream_passed_through_gives_back_its_slot_when_the_browser_goes(
    console: aiohttp.ClientSession, audit: TestServer, mongo_settings: MongoSettings
) -> None:
    user = bearer(await make_token(mongo_settings, "radiology"))
    slots = audit.app[STREAM_SLOTS]
    job = await (await console.post("/v1/jobs", json=JOB, headers=user)).json()
    path = f"/v1/events/stream?job={job['id']}"
    # More streams, one after another, than a token may hold at once.
    for _ in range(slots.per_token + 2):
        async with console.get(path, headers=user) as stream:
            assert stream.status == 200
            assert stream.content_type == "text/event-stream"
            first = await stream.content.readuntil(b"\n\n")
            assert first.startswith(b"id: ")
        # The tab closed (its connection with it): the audit's slot is free again, long
        # before the stream's next keep-alive would have found the connection gone.
        await eventually(lambda: _no_streams_open(slots), within=5.0)


async def _no_streams_open(slots: StreamSlots) -> bool:
    return not slots._open


async def test_the_pass_through_says_502_when_the_audit_is_down(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    user = bearer(await make_token(mongo_settings, "radiology"))
    answer = await scheduler.get("/v1/events/stream", headers=user)
    assert answer.status == 502
    assert "audit" in (await answer.json())["error"]["detail"]
