"""`GET /v1/events`: filters, pagination, and who may see which tenant's records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.auth import Role
from shared.bus import Bus
from shared.messages.jobs import JobEvent, JobState
from shared.messages.nodes import NodeStatus
from tests.integration.audit.conftest import Client, StartApp
from tests.integration.audit.support import auth, stored

T0 = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
#: (job, tenant, state) of the job events published, one minute apart from T0.
EVENTS = [
    ("j1", "t1", JobState.queued),
    ("j1", "t1", JobState.running),
    ("j2", "t2", JobState.queued),
    ("j1", "t1", JobState.succeeded),
    ("j3", "t2", JobState.running),
    ("j4", "t1", JobState.queued),
]


@pytest.fixture
async def client(start_app: StartApp, bus: Bus, records: Any) -> Client:
    """An app holding the job events above, then one `node.online` (no tenant)."""
    client = await start_app()
    for minute, (job, tenant, state) in enumerate(EVENTS):
        await bus.emit(
            f"job.{state.value}",
            JobEvent(job_id=job, state=state),
            correlation_id=job,
            tenant=tenant,
            occurred_at=T0 + timedelta(minutes=minute),
        )
    status = NodeStatus(node_id="n1", cpus=4, memory_mb=1024, heartbeat_s=5, started_at=T0)
    await bus.emit("node.online", status, occurred_at=T0 + timedelta(minutes=len(EVENTS)))
    await stored(records, len(EVENTS) + 1)
    return client


async def _events(client: Client, token: str, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/events", params=params, headers=auth(token))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["next_after"] is None
    events: list[dict[str, Any]] = body["events"]
    return events


def _jobs_and_types(events: list[dict[str, Any]]) -> list[tuple[str | None, str]]:
    return [(event["job_id"], event["type"]) for event in events]


async def test_filters_by_job_type_prefix_and_time(client: Client, token: Any) -> None:
    operator = await token("ops", Role.operator)
    assert _jobs_and_types(await _events(client, operator, job="j1")) == [
        ("j1", "job.queued"),
        ("j1", "job.running"),
        ("j1", "job.succeeded"),
    ]
    assert [e["job_id"] for e in await _events(client, operator, type="job.queued")] == [
        "j1",
        "j2",
        "j4",
    ]
    assert _jobs_and_types(await _events(client, operator, type="node.")) == [(None, "node.online")]
    window = await _events(
        client,
        operator,
        since=(T0 + timedelta(minutes=1)).isoformat(),
        until=(T0 + timedelta(minutes=3)).isoformat(),
    )
    assert _jobs_and_types(window) == [("j1", "job.running"), ("j2", "job.queued")]
    first = window[0]
    assert first["occurred_at"] == "2025-01-31T12:01:00.000+00:00"
    assert first["envelope"]["payload"]["state"] == "running"
    assert {"id", "seq", "hash", "prev_hash", "recorded_at", "user_id"} <= first.keys()


async def test_pages_follow_next_after_to_the_end(client: Client, token: Any) -> None:
    operator = await token("ops", Role.operator)
    seqs, after, pages = [], 0, 0
    while after is not None:
        response = await client.get(
            "/v1/events", params={"limit": 3, "after": after}, headers=auth(operator)
        )
        body = await response.json()
        assert len(body["events"]) <= 3
        seqs += [event["seq"] for event in body["events"]]
        after, pages = body["next_after"], pages + 1
    assert seqs == list(range(1, len(EVENTS) + 2))
    assert pages == 3


async def test_a_user_sees_only_its_own_tenant(client: Client, token: Any) -> None:
    user = await token("t1")
    mine = await _events(client, user)
    assert [(e["job_id"], e["tenant"]) for e in mine] == [
        ("j1", "t1"),
        ("j1", "t1"),
        ("j1", "t1"),
        ("j4", "t1"),
    ]
    assert await _events(client, user, tenant="t1") == mine
    assert await _events(client, user, job="j2") == []
    response = await client.get("/v1/events", params={"tenant": "t2"}, headers=auth(user))
    assert response.status == 403
    assert "own tenant" in (await response.json())["error"]["detail"]


async def test_an_operator_sees_every_tenant_and_may_filter_by_one(
    client: Client, token: Any
) -> None:
    operator = await token("ops", Role.operator)
    assert len(await _events(client, operator)) == len(EVENTS) + 1
    assert [e["job_id"] for e in await _events(client, operator, tenant="t2")] == ["j2", "j3"]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"after": "-1"}, "after"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2025-13-01"}, "until"),
        ({"since": "0001-01-01T00:00:00+14:00"}, "since"),  # F7: before year 1 in UTC
    ],
)
async def test_bad_query_values_are_400_naming_the_parameter(
    client: Client, token: Any, params: dict[str, str], named: str
) -> None:
    # The stream takes the filters and the cursor too, and refuses them before its headers.
    paths = ["/v1/events"] + (["/v1/events/stream"] if named != "limit" else [])
    for path in paths:
        response = await client.get(path, params=params, headers=auth(await token("t1")))
        assert response.status == 400
        assert named in (await response.json())["error"]["detail"]


async def test_without_a_token_the_answer_is_401_json(client: Client) -> None:
    for path in ("/v1/events", "/v1/events/stream", "/v1/audit/verify"):
        response = await client.get(path)
        assert response.status == 401
        assert response.content_type == "application/json"
        assert "bearer token" in (await response.json())["error"]["detail"]


async def test_roles_reach_only_their_routes_and_methods_are_named(
    client: Client, token: Any
) -> None:
    """F12: a node's token reads no records; a user's verifies no chain. F13: 405 + Allow."""
    node = auth(await token("_nodes", Role.node))
    for path in ("/v1/events", "/v1/events/stream", "/v1/audit/verify"):
        response = await client.get(path, headers=node)
        assert response.status == 403, path
    response = await client.get("/v1/audit/verify", headers=auth(await token("t1")))
    assert response.status == 403
    response = await client.post("/v1/events", headers=auth(await token("t1")))
    assert response.status == 405
    assert "GET" in response.headers["Allow"]
    assert (await response.json())["error"]["status"] == 405
