"""Every route of the datacache API, every kind of caller: one table of expected answers.

Nodes reach the job's data only through the grant of the node the job runs on; users
and operators reach only their own tenant's results; every refusal is recorded.
"""

from __future__ import annotations

import hashlib
from typing import Any

from shared.auth import Role
from shared.settings import MongoSettings
from tests.helpers import CALLERS, METRICS_ROUTE, bearer, check_role_matrix, make_token
from tests.integration.datacache.conftest import Harness
from tests.integration.datacache.http_origin import Origin

#: On every API route: no token, a bad one, and a token that reads only /metrics.
AUTH = {"none": 401, "invalid": 401, "metrics": 403}
NODE_ROUTE = {**AUTH, "user": 403, "other_user": 403, "operator": 403, "node": 200,
              "other_node": 403}  # fmt: skip
TABLE = {
    ("GET", "/v1/openapi.json"): dict.fromkeys(CALLERS, 200),  # public
    ("GET", "/metrics"): METRICS_ROUTE,
    ("GET", "/v1/jobs/{job_id}/inputs"): NODE_ROUTE,
    ("GET", "/v1/jobs/{job_id}/objects/{sha256}"): NODE_ROUTE,
    ("GET", "/v1/jobs/{job_id}/objects/{sha256}/sealed"): NODE_ROUTE,
    # The object is sound: the report is checked and answered, nothing is quarantined.
    ("POST", "/v1/jobs/{job_id}/objects/{sha256}/damaged"): NODE_ROUTE,
    ("PUT", "/v1/jobs/{job_id}/outputs/{path}"): {**NODE_ROUTE, "node": 201},
    ("POST", "/v1/jobs/{job_id}/outputs/{path}"): {**NODE_ROUTE, "node": 201},
    ("POST", "/v1/jobs/{job_id}/delegates"): {**NODE_ROUTE, "node": 201},
    # Another tenant's listing is empty, not an error: nothing of the job shows.
    ("GET", "/v1/jobs/{job_id}/outputs"): {**AUTH, "user": 200, "other_user": 200,
                                           "operator": 200, "node": 403, "other_node": 403},
    ("GET", "/v1/jobs/{job_id}/outputs/{path}"): {**AUTH, "user": 200, "other_user": 404,
                                                  "operator": 404, "node": 403,
                                                  "other_node": 403},
}  # fmt: skip


async def test_each_caller_gets_what_the_table_says_on_every_route(
    harness: Harness, origin: Origin, mongo_settings: MongoSettings
) -> None:
    data = b"an input"
    origin.files["in.bin"] = data
    await harness.stage("job-m", f"{origin.url}/in.bin")
    await harness.staged("job-m")
    await harness.grant("job-m")
    headers = {
        "none": {},
        "invalid": bearer("mh_not-a-token"),
        "user": harness.user_auth,
        "other_user": bearer(await make_token(mongo_settings, "cardiology")),
        "operator": bearer(await make_token(mongo_settings, "ops", Role.operator)),
        "node": harness.node_auth,
        "other_node": harness.other_node_auth,
        "metrics": bearer(await make_token(mongo_settings, "_metrics", Role.metrics)),
    }
    stored = await harness.client.put(
        "/v1/jobs/job-m/outputs/result.txt", data=b"a result", headers=harness.node_auth
    )
    assert stored.status == 201

    def fill(template: str) -> str:
        return (
            template.replace("{job_id}", "job-m")
            .replace("{sha256}", hashlib.sha256(data).hexdigest())
            .replace("{path}", "result.txt")
        )

    def body(method: str, _: str) -> dict[str, Any]:
        return {"data": b"a result"} if "outputs" in _ else {}

    await check_role_matrix(harness.client, TABLE, headers, fill, body)
