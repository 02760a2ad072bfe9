"""Every route of the job API, every kind of caller: one table of expected answers."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from shared.auth import Role
from shared.settings import MongoSettings
from tests.helpers import CALLERS, bearer, check_role_matrix, make_token

JOB = {"name": "matrix", "image": "medhive/busybox:1", "command": ["true"]}


def row(user: int, other_user: int, operator: int) -> dict[str, int]:
    """Authentication first (401), then role (403 for node tokens), then tenancy."""
    return {"none": 401, "invalid": 401, "user": user, "other_user": other_user,
            "operator": operator, "node": 403, "other_node": 403}  # fmt: skip


#: A job of the user's tenant exists; the other user and the operator are of other
#: tenants (an operator reads every tenant's audit, but acts on jobs as its tenant).
TABLE = {
    ("POST", "/v1/jobs"): row(201, 201, 201),
    ("POST", "/v1/jobs/batch"): row(200, 200, 200),
    ("GET", "/v1/jobs"): row(200, 200, 200),
    ("GET", "/v1/jobs/{job_id}"): row(200, 404, 404),
    ("DELETE", "/v1/jobs/{job_id}"): row(202, 404, 404),
    ("GET", "/v1/jobs/{job_id}/logs"): row(200, 404, 404),
    ("GET", "/v1/jobs/{job_id}/outputs"): row(200, 404, 404),
    ("GET", "/v1/jobs/{job_id}/outputs/{path}"): row(404, 404, 404),  # it has none
    ("GET", "/v1/openapi.json"): dict.fromkeys(CALLERS, 200),  # public
    ("GET", "/v1/nodes"): row(200, 200, 200),
    ("GET", "/v1/tenants"): row(403, 403, 200),  # operators only
    ("PUT", "/v1/tenants/{tenant}"): row(403, 403, 200),
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
    }
    job = await (await scheduler.post("/v1/jobs", json=JOB, headers=headers["user"])).json()

    def fill(template: str) -> str:
        filled = template.replace("{job_id}", job["id"]).replace("{path}", "result.txt")
        return filled.replace("{tenant}", "radiology")

    def body(method: str, path: str) -> dict[str, Any]:
        if path.endswith("/batch"):
            return {"json": {"jobs": [JOB]}}
        if path.startswith("/v1/tenants/"):
            return {"json": {"share": 2}}
        return {"json": JOB} if method == "POST" else {}

    await check_role_matrix(scheduler, TABLE, headers, fill, body)
