"""Every route of the job API, every kind of caller: one table of expected answers."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from services.scheduler.settings import SchedulerSettings
from shared.auth import Role
from shared.settings import MongoSettings
from tests.helpers import CALLERS, METRICS_ROUTE, bearer, check_role_matrix, make_token

JOB = {"name": "matrix", "image": "medhive/busybox:1", "command": ["true"]}
#: Nothing listens there: a test message to it fails and is retried, on this machine.
HOOK = {"url": "http://127.0.0.1:9/hooks", "events": ["job.succeeded"]}


@pytest.fixture
def scheduler_settings(scheduler_settings: SchedulerSettings) -> SchedulerSettings:
    """Webhooks may go to this machine: the table registers some."""
    return scheduler_settings.model_copy(update={"webhook_allowed_hosts": ["127.0.0.1"]})


def row(user: int, other_user: int, operator: int) -> dict[str, int]:
    """Authentication first (401), then role (403 for node and metrics tokens), then
    tenancy."""
    return {"none": 401, "invalid": 401, "user": user, "other_user": other_user,
            "operator": operator, "node": 403, "other_node": 403, "metrics": 403}  # fmt: skip


#: A job of the user's tenant exists; the other user and the operator are of other
#: tenants (an operator reads every tenant's audit, but acts on jobs as its tenant).
TABLE = {
    ("POST", "/v1/jobs"): row(201, 201, 201),
    ("POST", "/v1/jobs/batch"): row(200, 200, 200),
    ("GET", "/v1/jobs"): row(200, 200, 200),
    ("GET", "/v1/me"): row(200, 200, 200),
    ("GET", "/v1/jobs/{job_id}"): row(200, 404, 200),  # an operator reads any job
    ("DELETE", "/v1/jobs/{job_id}"): row(202, 404, 404),
    ("GET", "/v1/jobs/{job_id}/logs"): row(200, 404, 404),
    ("GET", "/v1/jobs/{job_id}/outputs"): row(200, 404, 404),
    ("GET", "/v1/jobs/{job_id}/outputs/{path}"): row(404, 404, 404),  # it has none
    ("GET", "/v1/openapi.json"): dict.fromkeys(CALLERS, 200),  # public
    ("GET", "/metrics"): METRICS_ROUTE,
    ("GET", "/v1/nodes"): row(200, 200, 200),
    ("GET", "/v1/tenants"): row(403, 403, 200),  # operators only
    ("GET", "/ui"): dict.fromkeys(CALLERS, 200),  # the console: public (a redirect to /ui/)
    ("GET", "/ui/"): dict.fromkeys(CALLERS, 200),
    ("GET", "/ui/{name}"): dict.fromkeys(CALLERS, 200),
    # The audit's read routes, passed through (no audit runs here: 502 once let in).
    ("GET", "/v1/events"): row(502, 502, 502),
    ("GET", "/v1/events/head"): row(502, 502, 502),
    ("GET", "/v1/events/stream"): row(502, 502, 502),
    ("GET", "/v1/audit/verify"): row(502, 502, 502),
    ("PUT", "/v1/tenants/{tenant}"): row(403, 403, 200),
    ("POST", "/v1/webhooks"): row(201, 201, 201),
    ("GET", "/v1/webhooks"): row(200, 200, 200),
    ("POST", "/v1/webhooks/{webhook_id}/test"): row(202, 404, 404),
    ("DELETE", "/v1/webhooks/{webhook_id}"): row(200, 404, 404),  # after its test: it goes
}


async def test_each_caller_gets_what_the_table_says_on_every_route(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    headers = {
        "none": {},
        "invalid": bearer("mh_not-a-token"),
        "user": bearer(await make_token(mongo_settings, "radiology")),
        "other_user": bearer(await make_token(mongo_settings, "cardiology")),
        "operator": bearer(await make_token(mongo_settings, "ops", Role.operator)),
        "node": bearer(await make_token(mongo_settings, "_nodes", Role.node, name="n1")),
        "other_node": bearer(await make_token(mongo_settings, "_nodes", Role.node, name="n2")),
        "metrics": bearer(await make_token(mongo_settings, "_metrics", Role.metrics)),
    }
    job = await (await scheduler.post("/v1/jobs", json=JOB, headers=headers["user"])).json()
    hook = await (await scheduler.post("/v1/webhooks", json=HOOK, headers=headers["user"])).json()

    def fill(template: str) -> str:
        filled = template.replace("{job_id}", job["id"]).replace("{path}", "result.txt")
        filled = filled.replace("{webhook_id}", hook["id"])
        return filled.replace("{tenant}", "radiology").replace("{name}", "console.js")

    def body(method: str, path: str) -> dict[str, Any]:
        if path.endswith("/batch"):
            return {"json": {"jobs": [JOB]}}
        if path.startswith("/v1/tenants/"):
            return {"json": {"share": 2}}
        if path.startswith("/v1/webhooks"):
            return {"json": HOOK} if path == "/v1/webhooks" else {}
        return {"json": JOB} if method == "POST" else {}

    await check_role_matrix(scheduler, TABLE, headers, fill, body)
