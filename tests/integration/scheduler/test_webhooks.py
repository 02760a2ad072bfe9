"""The webhook routes: registration and its rules, tenancy, limits, secrets at rest."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from services.scheduler.app import create_app
from services.scheduler.settings import SchedulerSettings
from shared.auth import Role
from shared.mongo import connect
from shared.settings import MongoSettings
from tests.helpers import bearer, make_token
from tests.integration.scheduler.webhook_support import quick, register

RECEIVER = "http://127.0.0.1:9/hooks"  # allow-listed below; nothing is sent in these tests
KEY = SecretStr(base64.b64encode(os.urandom(32)).decode())


@pytest.fixture
async def hooks(scheduler_settings: SchedulerSettings, aiohttp_client: Any) -> TestClient:
    settings = quick(scheduler_settings, webhook_max_per_tenant=3, webhook_secret_key=KEY)
    client: TestClient = await aiohttp_client(create_app(settings))
    return client


async def test_a_webhook_is_seen_removed_and_tested_by_its_own_tenant_only(
    hooks: TestClient, mongo_settings: MongoSettings
) -> None:
    mine = bearer(await make_token(mongo_settings, "radiology"))
    created = await register(hooks, mine, RECEIVER, ["job.succeeded", "job.failed"])
    assert created["secret"].startswith("whsec_")
    assert created["events"] == ["job.failed", "job.succeeded"]
    path = f"/v1/webhooks/{created['id']}"

    others = [
        bearer(await make_token(mongo_settings, "cardiology")),
        bearer(await make_token(mongo_settings, "ops", Role.operator)),
    ]
    for other in others:
        assert (await (await hooks.get("/v1/webhooks", headers=other)).json()) == {"webhooks": []}
        for method, target in [("POST", f"{path}/test"), ("DELETE", path)]:
            response = await hooks.request(method, target, headers=other)
            assert response.status == 404, (method, target)

    listing = await (await hooks.get("/v1/webhooks", headers=mine)).json()
    assert [w["id"] for w in listing["webhooks"]] == [created["id"]]
    assert "secret" not in listing["webhooks"][0]
    queued = await hooks.post(f"{path}/test", headers=mine)
    assert queued.status == 202
    assert (await queued.json())["delivery_id"].startswith("msg_")
    assert (await hooks.delete(path, headers=mine)).status == 200
    assert (await hooks.delete(path, headers=mine)).status == 404
    assert (await (await hooks.get("/v1/webhooks", headers=mine)).json()) == {"webhooks": []}


async def test_events_must_be_job_events_and_the_body_has_no_strays(
    hooks: TestClient, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "radiology"))
    bad_bodies = [
        ({"url": RECEIVER, "events": ["job.sleeping"]}, "events.0"),
        ({"url": RECEIVER, "events": ["data.staged"]}, "events.0"),
        ({"url": RECEIVER, "events": []}, "events"),
        ({"url": RECEIVER, "events": ["job.*"], "secret": "mine"}, "secret"),
        ({"events": ["job.*"]}, "url"),
    ]
    for body, field in bad_bodies:
        response = await hooks.post("/v1/webhooks", json=body, headers=auth)
        assert response.status == 422, body
        problems = (await response.json())["error"]["problems"]
        assert [p["field"] for p in problems] == [field], body
    await register(hooks, auth, RECEIVER, ["job.*", "job.interactive_ready"])


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.org/x", "https://"),
        ("https://user:pw@127.0.0.1:9/", "no credentials"),
        ("http://10.1.2.3/", "http:// only to allow-listed hosts"),
        ("https://10.1.2.3/", "10.1.2.3 is a private address"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://[::1]:9/", "::1 is a loopback address"),
        ("https://[::ffff:192.168.1.1]/", "embeds 192.168.1.1 is a private address"),
        ("https://localhost:9/", "localhost resolves to 127.0.0.1 is a loopback address"),
    ],
)
async def test_a_url_outside_the_rule_is_refused_with_its_reason(
    scheduler: TestClient, mongo_settings: MongoSettings, url: str, reason: str
) -> None:
    """No allow-list here: https:// to public addresses only."""
    auth = bearer(await make_token(mongo_settings, "radiology"))
    response = await scheduler.post(
        "/v1/webhooks", json={"url": url, "events": ["job.*"]}, headers=auth
    )
    assert response.status == 422
    (problem,) = (await response.json())["error"]["problems"]
    assert problem["field"] == "url"
    assert reason in problem["problem"]


async def test_a_tenant_has_only_so_many_webhooks(
    hooks: TestClient, mongo_settings: MongoSettings
) -> None:
    mine = bearer(await make_token(mongo_settings, "radiology"))
    for _ in range(3):
        await register(hooks, mine, RECEIVER)
    response = await hooks.post(
        "/v1/webhooks", json={"url": RECEIVER, "events": ["job.*"]}, headers=mine
    )
    assert response.status == 409
    assert "remove one first" in (await response.json())["error"]["detail"]
    await register(hooks, bearer(await make_token(mongo_settings, "cardiology")), RECEIVER)


async def test_the_database_keeps_no_secret_in_the_clear(
    hooks: TestClient, mongo_settings: MongoSettings, scheduler_settings: SchedulerSettings
) -> None:
    created = await register(hooks, bearer(await make_token(mongo_settings, "radiology")), RECEIVER)
    client = connect(mongo_settings)
    try:
        stored = await client[scheduler_settings.database]["webhooks"].find_one(
            {"_id": created["id"]}
        )
    finally:
        await client.close()
    assert stored is not None
    secret_bytes = base64.b64decode(created["secret"].removeprefix("whsec_"))
    assert set(stored["secret"]) == {"sealed"}
    assert created["secret"].encode() not in stored["secret"]["sealed"]
    assert secret_bytes not in stored["secret"]["sealed"]
