"""Tenants share the nodes fairly (services/scheduler/tenants.py): fair share over
held and decayed usage, quotas that hold under concurrent submissions, and no job
held back by jobs that cannot run.

The real scheduler places; a node of the test's own runs what it is sent: it reports
each job started at once and finished after `hold_s`, `slots` at a time (its capacity,
of jobs of one cpu), and keeps the order in which jobs reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiohttp.test_utils import TestClient

from services.scheduler.app import create_app
from services.scheduler.settings import SchedulerSettings
from shared.auth import Role
from shared.bus import Bus
from shared.envelope import utcnow
from shared.messages.catalog import COMMANDS
from shared.messages.nodes import NodeStatus, RunFinished, RunStarted
from shared.mongo import connect
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import bearer, event_tap, make_token, publish_raw
from tests.integration.scheduler.test_amqp_commands import message_id, submit_body, user_url

JOB = {"image": "x", "resources": {"cpus": 1, "memory_mb": 256}}


@dataclass
class Node:
    """A node that runs whatever it is sent for `hold_s` seconds."""

    bus: Bus
    node_id: str
    hold_s: float
    #: (tenant, job_id) in the order the jobs reached the node
    ran: list[tuple[str, str]] = field(default_factory=list)
    #: job_id -> seconds it ran here (from its arrival to its reported end)
    held_s: dict[str, float] = field(default_factory=dict)
    #: notified when a job reaches the node and when it ends
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def on_command(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            envelope = json.loads(message.body)
            if envelope["type"] != "node.run":
                return
            run = envelope["payload"]
            async with self.changed:
                self.ran.append((run["tenant"], run["job_id"]))
                self.changed.notify_all()
            started = RunStarted(job_id=run["job_id"], attempt=run["attempt"],
                                 node_id=self.node_id, workload_id=run["job_id"])  # fmt: skip
            await self.bus.emit("run.started", started, correlation_id=run["job_id"])
            arrived = time.monotonic()
            asyncio.get_running_loop().call_later(
                self.hold_s, lambda: asyncio.ensure_future(self._finish(run, arrived))
            )

    async def _finish(self, run: dict[str, Any], arrived: float) -> None:
        async with self.changed:
            self.held_s[run["job_id"]] = time.monotonic() - arrived
            self.changed.notify_all()
        done = RunFinished(job_id=run["job_id"], attempt=run["attempt"], node_id=self.node_id,
                           outcome="succeeded", exit_code=0)  # fmt: skip
        await self.bus.emit("run.finished", done, correlation_id=run["job_id"])

    async def until(self, count: int, within: float = 60) -> list[tuple[str, str]]:
        """The jobs that reached the node, once `count` have."""
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(lambda: len(self.ran) >= count)
        return list(self.ran)

    async def ended(self, job_ids: set[str], within: float = 30) -> None:
        """Once the node has run each of `job_ids` to its end."""
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(lambda: job_ids <= self.held_s.keys())


@contextlib.asynccontextmanager
async def node(
    amqp: AmqpSettings, slots: int, hold_s: float, node_id: str = "n1"
) -> AsyncIterator[Node]:
    bus = Bus(amqp, "node@test")
    await bus.connect()
    connection = await aio_pika.connect(amqp.url.get_secret_value())
    pretended = Node(bus, node_id, hold_s)
    try:
        queue = await (await connection.channel()).declare_queue(exclusive=True)
        await queue.bind(COMMANDS, f"node.{node_id}.#")
        await queue.consume(pretended.on_command)
        status = NodeStatus(node_id=node_id, cpus=slots, memory_mb=256 * slots,
                            runtimes=["container"], heartbeat_s=30,
                            started_at=utcnow())  # fmt: skip
        await bus.emit("node.online", status)
        yield pretended
    finally:
        await connection.close()
        await bus.close()


async def submit_many(
    scheduler: TestClient, token: str, count: int, **fields: Any
) -> list[dict[str, Any]]:
    """`count` jobs in batches of 100, as a hospital system submits a backlog."""
    jobs: list[dict[str, Any]] = []
    for start in range(0, count, 100):
        batch = [{**JOB, "name": f"j{i}", **fields} for i in range(start, min(count, start + 100))]
        answer = await scheduler.post("/v1/jobs/batch", json={"jobs": batch},
                                      headers=bearer(token))  # fmt: skip
        assert answer.status == 200, await answer.text()
        jobs += [result["job"] for result in (await answer.json())["results"]]
    return jobs


async def set_tenant(scheduler: TestClient, operator: str, tenant: str, **policy: Any) -> None:
    answer = await scheduler.put(f"/v1/tenants/{tenant}", json=policy, headers=bearer(operator))
    assert answer.status == 200, await answer.text()


@pytest.fixture
async def operator(mongo_settings: MongoSettings) -> str:
    return await make_token(mongo_settings, "ops", Role.operator)


async def test_a_tenant_that_comes_later_is_not_queued_behind_anothers_backlog(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    """Equal shares, a node that runs 2 at a time: B's jobs start within the next
    placements after they arrive, then the two tenants take turns. The bound: B holds
    nothing and has used nothing, so its load is the lowest from its first submit on; at
    most the 2 jobs of A already decided in the pass under way go before B's first."""
    a = await make_token(mongo_settings, "tenant-a")
    b = await make_token(mongo_settings, "tenant-b")
    async with node(amqp_settings, slots=2, hold_s=0.05) as n1:
        await submit_many(scheduler, a, 300)
        before_b = len(await n1.until(6))  # A's backlog is being worked through
        await submit_many(scheduler, b, 20)
        ran = await n1.until(before_b + 2 + 2 * 20 + 2)
    after = ran[len(ran) - (len(ran) - before_b) :]
    first_b = next(i for i, (tenant, _) in enumerate(after) if tenant == "tenant-b")
    assert first_b <= 2 + 2, after[:8]  # the pass under way, then B
    b_positions = [i for i, (tenant, _) in enumerate(after) if tenant == "tenant-b"]
    assert len(b_positions) == 20 and b_positions[-1] < 2 + 2 * 20 + 2, b_positions
    assert sum(1 for tenant, _ in after if tenant == "tenant-a") < len(after) - 20 + 5


async def test_shares_three_to_one_give_three_times_the_resource_time(
    scheduler: TestClient,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    operator: str,
) -> None:
    """Both tenants always have work; the node runs 4 at a time. The resource-time the
    node gave each tenant (cpus x seconds it ran their jobs) over the first 200
    placements comes within 10 % of 3:1."""
    a = await make_token(mongo_settings, "big")
    b = await make_token(mongo_settings, "small")
    await set_tenant(scheduler, operator, "big", share=3)
    await submit_many(scheduler, a, 300)  # both backlogs wait before any node is there
    await submit_many(scheduler, b, 300)
    async with node(amqp_settings, slots=4, hold_s=0.1) as n1:
        window = (await n1.until(200, within=120))[:200]
        await n1.ended({job_id for _, job_id in window})
    times = {"big": 0.0, "small": 0.0}
    for tenant, job_id in window:
        times[tenant] += 1 * n1.held_s[job_id]  # one cpu each
    ratio = times["big"] / times["small"]
    assert 3 * 0.9 <= ratio <= 3 * 1.1, times


async def test_a_tenant_that_ran_much_yesterday_is_not_starved_today(
    scheduler_settings: SchedulerSettings,
    aiohttp_client: Any,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
) -> None:
    """Yesterday's usage (stored as a restart finds it) weighs half today, with the
    default half-life of a day: the tenant that used 100 cpu-hours yesterday gets fewer
    placements than the one that used nothing, but it gets some from the start."""
    client = connect(mongo_settings)
    try:
        await client[scheduler_settings.database]["tenants"].insert_one(
            {"_id": "yesterday", "usage": 100 * 3600.0, "usage_at": utcnow() - timedelta(days=1)}
        )
    finally:
        await client.close()
    scheduler = await aiohttp_client(create_app(scheduler_settings))
    heavy = await make_token(mongo_settings, "yesterday")
    fresh = await make_token(mongo_settings, "today")
    await submit_many(scheduler, heavy, 60)  # both wait before any node is there
    await submit_many(scheduler, fresh, 60)
    async with node(amqp_settings, slots=4, hold_s=0.1) as n1:
        ran = await n1.until(40)
    heavy_runs = [i for i, (tenant, _) in enumerate(ran[:40]) if tenant == "yesterday"]
    assert heavy_runs and heavy_runs[0] < 8, ran[:10]  # from the start, not after the other
    assert 5 <= len(heavy_runs) < 20, len(heavy_runs)  # fewer, but not none


async def test_quotas_hold_under_concurrent_submissions_and_placements(
    scheduler: TestClient,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    operator: str,
) -> None:
    await set_tenant(scheduler, operator, "quota", quota={"max_queued_jobs": 10,
                                                           "max_running_jobs": 2})  # fmt: skip
    first = await make_token(mongo_settings, "quota")
    second = await make_token(mongo_settings, "quota")

    async def one(token: str, i: int) -> Any:
        return await scheduler.post("/v1/jobs", json={**JOB, "name": f"q{i}"},
                                    headers=bearer(token))  # fmt: skip

    # No node yet: nothing leaves the queue while two clients submit at once.
    answers = await asyncio.gather(*(one(first if i % 2 else second, i) for i in range(30)))
    statuses = [answer.status for answer in answers]
    assert statuses.count(201) == 10 and statuses.count(429) == 20, statuses
    refused = await next(a for a in answers if a.status == 429).json()
    assert refused["error"]["detail"] == (
        "tenant 'quota' has 10 jobs waiting to be placed and may have at most 10: "
        "submit again once some have started"
    )
    async with node(amqp_settings, slots=8, hold_s=3600) as n1:  # runs and never ends
        ran = await n1.until(2)
        listing = await (await scheduler.get("/v1/tenants", headers=bearer(operator))).json()
        row = next(t for t in listing["tenants"] if t["tenant"] == "quota")
        assert (row["running_jobs"], row["queued_jobs"]) == (2, 8)
        accepted = [(await answer.json())["id"] for answer in answers if answer.status == 201]
        waiting = next(job_id for job_id in accepted if job_id not in {j for _, j in ran})
        job = await (await scheduler.get(f"/v1/jobs/{waiting}", headers=bearer(first))).json()
        assert job["waiting_for"] == "its tenant's running quota is reached (at most 2 jobs)"
        assert len(n1.ran) == 2  # the node had room for 8


async def test_jobs_no_node_can_run_never_hold_back_one_that_can(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    token = await make_token(mongo_settings, "radiology")
    async with node(amqp_settings, slots=2, hold_s=3600) as n1:
        huge = await submit_many(scheduler, token, 600, priority=100,
                                 resources={"cpus": 64, "memory_mb": 256})  # fmt: skip
        small = await scheduler.post("/v1/jobs", json={**JOB, "name": "small", "priority": 0},
                                     headers=bearer(token))  # fmt: skip
        small_id = (await small.json())["id"]
        ran = await n1.until(1)
        assert ran == [("radiology", small_id)]
        job = await (await scheduler.get(f"/v1/jobs/{huge[0]['id']}",
                                         headers=bearer(token))).json()  # fmt: skip
        assert job["waiting_for"] == (
            "no node seen so far could ever run it: it needs 64 cpus and 256 MiB (container)"
        )


async def test_a_restarted_scheduler_keeps_shares_quotas_and_usage(
    scheduler_settings: SchedulerSettings,
    aiohttp_client: Any,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    operator: str,
) -> None:
    first = await aiohttp_client(create_app(scheduler_settings))
    await set_tenant(first, operator, "kept", share=2.5, quota={"max_running_cpus": 3})
    token = await make_token(mongo_settings, "kept")
    async with (
        node(amqp_settings, slots=2, hold_s=0.3),
        event_tap(amqp_settings, ["job.succeeded"]) as ended,
    ):
        job = (await submit_many(first, token, 1))[0]
        # stored as ended (and its usage charged) before the event is published
        await ended.wait_for(lambda m: m["correlation_id"] == job["id"])
    before = await (await first.get("/v1/tenants", headers=bearer(operator))).json()
    await first.close()  # stopping writes the usage back

    second = await aiohttp_client(create_app(scheduler_settings))
    after = await (await second.get("/v1/tenants", headers=bearer(operator))).json()
    row = next(t for t in after["tenants"] if t["tenant"] == "kept")
    assert (row["share"], row["quota"]["max_running_cpus"]) == (2.5, 3)
    was = next(t for t in before["tenants"] if t["tenant"] == "kept")["usage_cpu_s"]
    assert was >= 0.3 and row["usage_cpu_s"] == pytest.approx(was, rel=0.01)


async def test_a_submit_over_amqp_past_the_queued_quota_is_refused_with_the_reason(
    scheduler: TestClient,
    amqp_settings: AmqpSettings,
    amqp_user: tuple[str, str],
    operator: str,
) -> None:
    """The hospital system's tenant (radiology) may have one job waiting: its second
    submit is dead-lettered, and `message.rejected` says why."""
    await set_tenant(scheduler, operator, "radiology", quota={"max_queued_jobs": 1})
    url = user_url(amqp_settings, amqp_user)
    async with event_tap(amqp_settings, ["job.queued", "message.rejected"]) as tap:
        for _ in range(2):
            body = submit_body()
            await publish_raw(url, body, "job.submit", user_id=amqp_user[0],
                              message_id=message_id(body))  # fmt: skip
        refused = await tap.wait_for(lambda m: m["type"] == "message.rejected")
        await tap.wait_for(lambda m: m["type"] == "job.queued")  # the first, through the outbox
    assert refused["payload"]["reason"] == (
        "tenant 'radiology' has 1 jobs waiting to be placed and may have at most 1: "
        "submit again once some have started"
    )
    assert [m["type"] for m in tap.messages].count("job.queued") == 1
