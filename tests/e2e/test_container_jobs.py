"""Container jobs through the real services, as processes, on real RabbitMQ and Docker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiodocker
import aiohttp
import pytest

from shared.settings import AmqpSettings
from tests.conftest import free_port
from tests.e2e.support import client, job_of_message, spec, submit_over_amqp, wait_state
from tests.processes import Stack

pytestmark = pytest.mark.slow

FULL_LIFE = ["submitted", "queued", "dispatched", "running", "succeeded"]


async def test_a_job_over_http_runs_and_the_cli_follows_it_to_its_output(
    stack: Stack, user_token: str, operator_token: str, tmp_path: Path
) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "name: greet\nimage: medhive/busybox:1\n"
        "command: [sh, -c, 'echo hello from medhive; echo warn >&2']\n"
    )
    env = {**os.environ, "MEDHIVE_API_URL": stack.api, "MEDHIVE_AUDIT_URL": stack.audit,
           "MEDHIVE_TOKEN": user_token}  # fmt: skip
    cli = [sys.executable, "-m", "medhive"]
    follow = await asyncio.to_thread(
        subprocess.run, [*cli, "submit", str(job_file), "--follow"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert follow.returncode == 0, follow.stdout + follow.stderr
    lines = follow.stdout.splitlines()
    job_id = lines[0].split()[1]
    shown = [line.split()[1] for line in lines[1:] if line[:2].isdigit()]
    assert shown == FULL_LIFE
    assert "hello from medhive" in follow.stdout and "warn" in follow.stdout

    logs = await asyncio.to_thread(
        subprocess.run, [*cli, "logs", job_id], env=env, capture_output=True, text=True
    )
    assert logs.stdout == "hello from medhive\n" and logs.stderr == "warn\n"

    async with client(stack, user_token) as api:
        job = await api.job(job_id)
        assert [h["state"] for h in job["history"]] == FULL_LIFE
        times = [h["at"] for h in job["history"]]
        assert times == sorted(times)
        assert job["exit_code"] == 0
        records, _ = await api.events({"job": job_id})
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    assert [r["type"] for r in records if r["type"].startswith("job.")] == [
        f"job.{s}" for s in FULL_LIFE
    ]
    assert {"run.started", "run.output", "run.finished"} <= {r["type"] for r in records}
    assert {r["tenant"] for r in records} == {"radiology"}


async def test_a_job_over_amqp_runs_for_the_senders_tenant(
    stack: Stack,
    amqp_settings: AmqpSettings,
    amqp_user: tuple[str, str],
    user_token: str,
    operator_token: str,
) -> None:
    message_id = await submit_over_amqp(
        amqp_settings, amqp_user, spec("from-ris", "sh", "-c", "echo study done")
    )
    async with client(stack, user_token) as api, client(stack, operator_token) as ops:
        job_id = await job_of_message(message_id, ops)
        job = await wait_state(api, job_id)
        assert job["state"] == "succeeded"
        assert job["tenant"] == "radiology" and job["actor"] == amqp_user[0]
        assert (await api.logs(job_id))["stdout"] == "study done\n"
        records, _ = await ops.events({"type": "job.submit"})  # a prefix: job.submitted too
        commands = [r for r in records if r["type"] == "job.submit"]
        assert [c["id"] for c in commands] == [message_id]
        assert commands[0]["user_id"] == amqp_user[0]


async def test_failure_paths_end_in_the_right_state_and_leave_no_container(
    stack: Stack, user_token: str
) -> None:
    async with client(stack, user_token) as api:
        failing = await api.submit(spec("exit-3", "sh", "-c", "exit 3"))
        too_long = await api.submit(spec("sleepy", "sleep", "600", walltime_s=2))
        missing = await api.submit({**spec("ghost", "true"), "image": "medhive/nothing:0"})
        cancelled = await api.submit(spec("to-cancel", "sleep", "600"))
        await wait_state(api, cancelled["id"], {"running"})
        await api.cancel(cancelled["id"])

        failed = await wait_state(api, failing["id"])
        assert (failed["state"], failed["exit_code"]) == ("failed", 3)
        assert "code 3" in failed["reason"]
        timed_out = await wait_state(api, too_long["id"])
        assert timed_out["state"] == "timed_out"
        ghost = await wait_state(api, missing["id"])
        assert ghost["state"] == "failed" and "medhive/nothing:0" in ghost["reason"]
        gone = await wait_state(api, cancelled["id"])
        assert gone["state"] == "cancelled"
        assert gone["history"][-2]["state"] == "running"

    async with aiodocker.Docker() as docker:
        left = await docker.containers.list(
            all=True, filters=json.dumps({"label": [f"medhive.node={stack.node_id}"]})
        )
    assert left == []


async def test_a_job_too_big_for_every_node_waits_then_runs_when_a_node_fits(
    stack: Stack, user_token: str, amqp_settings: AmqpSettings
) -> None:
    from tests.helpers import event_tap

    async with (
        client(stack, user_token) as api,
        event_tap(amqp_settings, ["node.heartbeat"]) as tap,
    ):
        big = await api.submit(
            spec("big", "echo", "fits", resources={"memory_mb": 4096, "cpus": 1})
        )
        # Placement runs on every heartbeat: after two of them it still has no node.
        await tap.wait_for(lambda m: True)
        first = len(tap.messages)
        await tap.wait_for(lambda m: len(tap.messages) > first + 1)
        assert (await api.job(big["id"]))["state"] == "queued"

        await stack.start(
            "vmnode-large", "vmnode",
            MEDHIVE_VMNODE_MEMORY_MB="8192",
            MEDHIVE_VMNODE_NODE_ID=f"{stack.node_id}-large",
            MEDHIVE_VMNODE_PORT=str(free_port()),
        )  # fmt: skip
        try:
            job = await wait_state(api, big["id"])
        except TimeoutError:
            raise AssertionError(
                f"{await api.job(big['id'])}\n{await api.nodes()}\n{stack.log('scheduler')}"
            ) from None
        assert job["state"] == "succeeded"
        assert job["node_id"] == f"{stack.node_id}-large"


async def test_the_audit_stream_is_live_and_resumes_after_a_disconnect_without_gap_or_duplicate(
    stack: Stack, user_token: str
) -> None:
    from medhive.client import parse_sse
    from tests.helpers import bearer

    url = f"{stack.audit}/v1/events/stream"
    seen: list[tuple[int, dict[str, object]]] = []
    async with (
        client(stack, user_token) as api,
        aiohttp.ClientSession(headers=bearer(user_token)) as session,
    ):
        first = await session.get(url, params={"type": "job."})
        job = await api.submit(spec("streamed", "sh", "-c", "sleep 1; echo ok"))
        async for event_id, record in parse_sse(first):
            seen.append((event_id, record))
            if len(seen) == 2:
                break
        first.close()  # the operator's connection drops mid-job

        headers = {"Last-Event-ID": str(seen[-1][0])}
        async with session.get(url, params={"type": "job."}, headers=headers) as second:
            async for event_id, record in parse_sse(second):
                seen.append((event_id, record))
                if record["type"] == "job.succeeded" and record["job_id"] == job["id"]:
                    break
        stored, _ = await api.events({"type": "job."})
    assert [event_id for event_id, _ in seen] == [r["seq"] for r in stored]
    assert [r["type"] for _, r in seen if r["job_id"] == job["id"]] == [
        f"job.{s}" for s in FULL_LIFE
    ]
