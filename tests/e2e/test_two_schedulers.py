"""Two schedulers and two audit recorders on one installation.

One of each is killed (SIGKILL) while jobs flow: the standby scheduler takes the lease
and goes on (the test reports the pause), no job is submitted or placed twice, every
job ends once, and the audit chain the two recorders wrote has every event once and
verifies. And a walltime the active scheduler enforced before it was killed is not
enforced again by the one that takes over: each overdue job is asked to stop once and
timed out once."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from medhive.client import Client
from shared.auth import Role
from shared.settings import AmqpSettings, MongoSettings
from tests.conftest import free_port
from tests.e2e.support import all_records, instant_stack, spec, submit_over_amqp
from tests.helpers import eventually, make_token
from tests.integration.scheduler.support import beating_node

pytestmark = pytest.mark.slow

#: Jobs offered over AMQP, and how many a second.
JOBS, RATE = 240, 15
#: The lease: a standby takes over this long after the active one's last renewal.
LEASE_S = 2
#: The longest no job may start while the standby takes over (the bound asserted).
MAX_GAP_S = 30.0


async def _count(ops: Client, type_: str) -> int:
    return len(await all_records(ops, {"type": type_}))


async def _at_least(ops: Client, type_: str, n: int) -> bool:
    return await _count(ops, type_) >= n


async def test_one_of_two_schedulers_and_recorders_killed_loses_and_doubles_nothing(
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    db_prefix: str,
    tmp_path: Path,
    amqp_user: tuple[str, str],
) -> None:
    operator_token = await make_token(mongo_settings, "ops", Role.operator)
    async with instant_stack(
        amqp_settings.url.get_secret_value(), mongo_settings, db_prefix, tmp_path,
        MEDHIVE_SCHEDULER_INSTANCE="scheduler-a", MEDHIVE_SCHEDULER_LEASE_S=str(LEASE_S),
    ) as stack:  # fmt: skip
        await stack.start("audit-b", "audit", MEDHIVE_AUDIT_PORT=str(free_port()))
        await stack.start(
            "scheduler-b", "scheduler", healthy=False,
            MEDHIVE_SCHEDULER_INSTANCE="scheduler-b", MEDHIVE_SCHEDULER_PORT=str(free_port()),
        )  # fmt: skip
        standby = stack.processes["scheduler-b"]

        async def offer() -> None:
            """Another hospital system's steady load (the pace is the load)."""
            for i in range(JOBS):
                await submit_over_amqp(amqp_settings, amqp_user, spec(f"pair-{i}", "true"))
                await asyncio.sleep(1 / RATE)

        def url(name: str) -> str:
            return f"http://127.0.0.1:{stack.ports[name]}"

        async with Client(url("scheduler-b"), url("audit-b"), operator_token) as ops:
            offering = asyncio.create_task(offer())
            await eventually(functools.partial(_at_least, ops, "job.running", 40), within=60)
            assert standby.poll() is None and not await _answers(url("scheduler-b"))
            stack.kill("scheduler")
            stack.kill("audit")
            await stack.healthy("scheduler-b")  # it took the lease
            await offering
            await eventually(functools.partial(_at_least, ops, "job.succeeded", JOBS), 120)
            records = await all_records(ops)
            verified = await ops.verify()

    def per_job(type_: str) -> Counter[str]:
        return Counter(r["job_id"] for r in records if r["type"] == type_)

    submitted = per_job("job.submitted")
    assert len(submitted) == JOBS and set(submitted.values()) == {1}, "a submission doubled"
    assert per_job("job.dispatched") == submitted, "a job was placed twice, or never"
    assert per_job("job.succeeded") == submitted, "a job ended twice, or never"
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "an audit record was stored twice"
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert verified["ok"], verified

    starts = sorted(
        datetime.fromisoformat(r["occurred_at"]) for r in records if r["type"] == "job.running"
    )
    gap_s = max((b - a).total_seconds() for a, b in itertools.pairwise(starts))
    print(f"longest time with no job started: {gap_s:.1f} s (lease {LEASE_S} s)")
    assert gap_s <= MAX_GAP_S, f"no job started for {gap_s:.1f} s"


async def _answers(base: str) -> bool:
    """Whether anything answers HTTP there (a standby scheduler does not listen)."""
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{base}/healthz") as r:
            return r.status < 500
    except aiohttp.ClientError:
        return False


async def test_a_deadline_enforced_before_a_failover_is_not_enforced_again(
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    db_prefix: str,
    tmp_path: Path,
) -> None:
    user_token = await make_token(mongo_settings, "radiology", Role.user)
    operator_token = await make_token(mongo_settings, "ops", Role.operator)
    async with instant_stack(
        amqp_settings.url.get_secret_value(), mongo_settings, db_prefix, tmp_path, agents=0,
        MEDHIVE_SCHEDULER_INSTANCE="scheduler-a", MEDHIVE_SCHEDULER_LEASE_S=str(LEASE_S),
        MEDHIVE_SCHEDULER_WALLTIME_GRACE_S="2", MEDHIVE_SCHEDULER_WATCHDOG_INTERVAL_S="0.5",
    ) as stack:  # fmt: skip
        await stack.start(
            "scheduler-b", "scheduler", healthy=False,
            MEDHIVE_SCHEDULER_INSTANCE="scheduler-b", MEDHIVE_SCHEDULER_PORT=str(free_port()),
        )  # fmt: skip
        # A node that beats, and never stops a job.
        async with beating_node(amqp_settings, "stuck") as commands:
            async with Client(stack.api, stack.audit, user_token) as api:
                jobs = [
                    (await api.submit(spec(f"overdue-{i}", "sleep", "600", walltime_s=1)))["id"]
                    for i in range(3)
                ]

            def stop_asked(job: str) -> Callable[[dict[str, Any]], bool]:
                return lambda m: m["type"] == "node.cancel" and m["payload"]["job_id"] == job

            for job in jobs:  # the active scheduler asks the node to stop each once...
                await commands.wait_for(stop_asked(job))
            stack.kill("scheduler")  # ...and is gone before it could time them out
            await stack.healthy("scheduler-b")
            url = f"http://127.0.0.1:{stack.ports['scheduler-b']}"
            async with Client(url, stack.audit, operator_token) as ops:
                await eventually(functools.partial(_at_least, ops, "job.timed_out", 3), 60)
                records = await all_records(ops)

    def per_job(type_: str) -> Counter[str]:
        return Counter(r["job_id"] for r in records if r["type"] == type_)

    once = Counter(dict.fromkeys(jobs, 1))
    assert per_job("node.run") == once
    assert per_job("node.cancel") == once, "a deadline was enforced twice"
    assert per_job("job.timed_out") == once
