"""Services killed mid-work, and a broker restart: no job and no event is lost."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.parse

import pytest

from shared.settings import AmqpSettings
from tests.conftest import free_port, rabbit_api
from tests.e2e.support import all_records, client, spec, wait_state
from tests.helpers import event_tap, eventually
from tests.processes import Stack

pytestmark = pytest.mark.slow


async def test_a_node_agent_killed_mid_job_adopts_it_and_the_job_ends_right(
    stack: Stack, user_token: str
) -> None:
    async with client(stack, user_token) as api:
        job = await api.submit(spec("survivor", "sh", "-c", "sleep 3; echo still here"))
        await wait_state(api, job["id"], {"running"})
        stack.kill("vmnode")
        await stack.restart("vmnode")
        done = await wait_state(api, job["id"])
        assert done["state"] == "succeeded"
        assert [h["state"] for h in done["history"]][-2:] == ["running", "succeeded"]
        assert (await api.logs(job["id"]))["stdout"] == "still here\n"


async def test_audit_killed_while_events_flow_loses_and_doubles_nothing(
    stack: Stack, user_token: str, operator_token: str, amqp_settings: AmqpSettings
) -> None:
    async with (
        client(stack, user_token) as api,
        client(stack, operator_token) as ops,
        event_tap(amqp_settings, ["#"]) as tap,
    ):
        jobs = [await api.submit(spec(f"flow-{i}", "echo", str(i))) for i in range(8)]
        await tap.wait_for(lambda m: m.get("type") == "job.running")
        stack.kill("audit")
        more = [await api.submit(spec(f"while-down-{i}", "true")) for i in range(4)]
        await stack.restart("audit")
        for job in jobs + more:
            await wait_state(api, job["id"])
        published = {m["id"] for m in tap.messages if "id" in m}

        async def audit_has_all() -> bool:
            stored = await all_records(ops)
            return published <= {r["id"] for r in stored}

        await eventually(audit_has_all)
        stored = await all_records(ops)
        ids = [r["id"] for r in stored]
        assert len(ids) == len(set(ids)), "a message was stored twice"
        seqs = [r["seq"] for r in stored]
        assert seqs == list(range(1, len(seqs) + 1)), "the chain has a gap"
        assert (await ops.verify())["ok"]


async def test_after_a_broker_restart_every_consumer_is_back_and_jobs_run(
    stack: Stack, user_token: str, vhost: str
) -> None:
    await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", "stop_app"], check=True)
    await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", "start_app"], check=True)
    expected = {"scheduler.commands", "scheduler.reports", "audit.all", f"node.{stack.node_id}"}

    async def consumers_back() -> bool:
        try:
            queues = rabbit_api("GET", f"/queues/{urllib.parse.quote(vhost, safe='')}")
        except OSError:
            return False  # the management API is still starting
        counts = {q["name"]: q.get("consumers", 0) for q in queues}  # type: ignore[union-attr]
        return all(counts.get(name, 0) >= 1 for name in expected)

    await eventually(consumers_back, within=90)
    async with client(stack, user_token) as api:
        job = await api.submit(spec("after-restart", "echo", "back"))
        done = await wait_state(api, job["id"], within=90)
    assert done["state"] == "succeeded"


async def test_a_job_lost_with_its_node_is_queued_again_and_runs_elsewhere(
    stack: Stack, user_token: str
) -> None:
    async with client(stack, user_token) as api:
        job = await api.submit(spec("lost-and-found", "sh", "-c", "sleep 2; echo ok", retries=1))
        await wait_state(api, job["id"], {"running"})
        stack.kill("vmnode")  # and it never comes back
        await stack.start(
            "vmnode-spare", "vmnode",
            MEDHIVE_VMNODE_NODE_ID=f"{stack.node_id}-large",
            MEDHIVE_VMNODE_PORT=str(free_port()),
        )  # fmt: skip
        done = await wait_state(api, job["id"], within=90)
    states = [h["state"] for h in done["history"]]
    assert done["state"] == "succeeded", states
    assert states[states.index("lost") :] == [
        "lost", "queued", "dispatched", "running", "succeeded"
    ]  # fmt: skip
    assert done["node_id"] == f"{stack.node_id}-large" and done["attempt"] == 2


async def test_a_scheduler_killed_mid_flow_loses_no_job_and_no_event(
    stack: Stack, user_token: str, operator_token: str, amqp_settings: AmqpSettings
) -> None:
    async with (
        client(stack, user_token) as api,
        client(stack, operator_token) as ops,
        event_tap(amqp_settings, ["job.dispatched"]) as tap,
    ):
        jobs = [await api.submit(spec(f"batch-{i}", "sh", "-c", "sleep 1")) for i in range(6)]
        await tap.wait_for(lambda m: True)  # placement has begun
        stack.kill("scheduler")
        await stack.restart("scheduler")
        finished = [await wait_state(api, job["id"], within=90) for job in jobs]
        assert {job["state"] for job in finished} == {"succeeded"}

        async def trail_complete() -> bool:
            records = await all_records(ops)
            return all(
                [r["type"] for r in records if r["job_id"] == job["id"] and
                 r["type"].startswith("job.") and r["type"] not in ("job.submit",)]
                == [f"job.{h['state']}" for h in job["history"]]
                for job in finished
            )  # fmt: skip

        # Every stored transition was published exactly once, in order, despite the kill.
        # (Each check reads the whole audit store; on a loaded machine that takes a while.)
        await eventually(trail_complete, within=90)


async def test_a_job_submitted_while_the_broker_is_away_is_taken_and_runs_once_it_is_back(
    stack: Stack, user_token: str
) -> None:
    """The job is stored, so the client is told so at once; its messages wait in the
    outbox until the broker is back (no 500, no request held for the broker)."""
    await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", "stop_app"], check=True)
    try:
        async with client(stack, user_token) as api:
            job = await api.submit(spec("while-away", "echo", "waited"))
            # Stored and answered: queued, or placed at once on the node that is still
            # online; either way its messages wait in the outbox.
            assert job["state"] in ("queued", "dispatched")
    finally:
        await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", "start_app"], check=True)
    async with client(stack, user_token) as api:
        done = await wait_state(api, job["id"], within=120)
        assert done["state"] == "succeeded"
        assert (await api.logs(job["id"]))["stdout"] == "waited\n"
