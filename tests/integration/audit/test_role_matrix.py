"""Every route of the audit API, every kind of caller: one table of expected answers."""

from __future__ import annotations

from typing import Any

from shared.auth import Role
from tests.helpers import CALLERS, METRICS_ROUTE, check_role_matrix
from tests.integration.audit.conftest import StartApp
from tests.integration.audit.support import auth

#: On every API route: no token, a bad one, and a token that reads only /metrics.
ANYONE = {"none": 401, "invalid": 401, "metrics": 403}
TABLE = {
    ("GET", "/v1/events"): {**ANYONE, "user": 200, "other_user": 200, "operator": 200,
                            "node": 403, "other_node": 403},
    ("GET", "/v1/events/head"): {**ANYONE, "user": 200, "other_user": 200, "operator": 200,
                                 "node": 403, "other_node": 403},
    ("GET", "/v1/events/stream"): {**ANYONE, "user": 200, "other_user": 200, "operator": 200,
                                   "node": 403, "other_node": 403},
    ("GET", "/v1/openapi.json"): dict.fromkeys(CALLERS, 200),  # public
    ("GET", "/metrics"): METRICS_ROUTE,
    ("GET", "/v1/audit/verify"): {**ANYONE, "user": 403, "other_user": 403, "operator": 200,
                                  "node": 403, "other_node": 403},
}  # fmt: skip


async def test_each_caller_gets_what_the_table_says_on_every_route(
    start_app: StartApp, token: Any
) -> None:
    client = await start_app()
    headers = {
        "none": {},
        "invalid": auth("mh_not-a-token"),
        "user": auth(await token("radiology")),
        "other_user": auth(await token("cardiology")),
        "operator": auth(await token("ops", Role.operator)),
        "node": auth(await token("_nodes", Role.node)),
        "other_node": auth(await token("_other_nodes", Role.node)),
        "metrics": auth(await token("_metrics", Role.metrics)),
    }
    await check_role_matrix(client, TABLE, headers, fill=lambda path: path)
