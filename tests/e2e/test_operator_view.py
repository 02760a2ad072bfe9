"""What users and operators see through the CLI, and bad input reaching the audit trail."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from shared.settings import AmqpSettings
from tests.e2e.support import client, recorded, spec, wait_state
from tests.helpers import publish_raw
from tests.processes import Stack

pytestmark = pytest.mark.slow


async def _cli(stack: Stack, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEDHIVE_API_URL": stack.api, "MEDHIVE_AUDIT_URL": stack.audit,
           "MEDHIVE_TOKEN": token}  # fmt: skip
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "medhive", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_the_cli_lists_shows_cancels_and_reads_the_audit_trail(
    stack: Stack, user_token: str, operator_token: str
) -> None:
    async with client(stack, user_token) as api:
        job = await api.submit(spec("long", "sleep", "600"))
        await wait_state(api, job["id"], {"running"})

        listing = await _cli(stack, user_token, "jobs", "--state", "running")
        assert job["id"] in listing.stdout and "long" in listing.stdout
        nodes = await _cli(stack, user_token, "nodes")
        assert f"{stack.node_id}  online" in nodes.stdout
        assert "cpus 1/2" in nodes.stdout  # the running job reserves one of two cores

        cancel = await _cli(stack, user_token, "cancel", job["id"])
        assert cancel.returncode == 0 and "cancel requested" in cancel.stdout
        await wait_state(api, job["id"])
        shown = json.loads((await _cli(stack, user_token, "status", job["id"])).stdout)
        assert shown["state"] == "cancelled"

    trail = await _cli(stack, operator_token, "audit", "tail", "--job", job["id"])
    types = [json.loads(line)["type"] for line in trail.stdout.splitlines()]
    assert types[:2] == ["job.submitted", "job.queued"] and types[-1] == "job.cancelled"
    assert "node.cancel" in types  # commands are audited too
    # An operator lists every tenant's jobs, by name.
    everyone = await _cli(stack, operator_token, "jobs", "--tenant", "*", "--name", "lo")
    assert f"{job['id']}  cancelled   radiology  long" in everyone.stdout
    refused = await _cli(stack, user_token, "jobs", "--tenant", "cardiology")
    assert refused.returncode == 2 and "403" in refused.stderr
    verify = await _cli(stack, operator_token, "audit", "verify")
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True

    missing = await _cli(stack, user_token, "status", "j-000000000000deadbeef")
    assert missing.returncode == 2 and "404" in missing.stderr
    forbidden = await _cli(stack, user_token, "audit", "verify")
    assert forbidden.returncode == 2 and "403" in forbidden.stderr


async def test_a_malformed_command_is_dead_lettered_and_recorded_in_audit(
    stack: Stack, amqp_settings: AmqpSettings, amqp_user: tuple[str, str], operator_token: str
) -> None:
    vhost = amqp_settings.url.get_secret_value().rsplit("/", 1)[1]
    url = f"amqp://{amqp_user[0]}:{amqp_user[1]}@127.0.0.1:5672/{vhost}"
    await publish_raw(url, b'{"type": "job.submit", "payload": 42}', "job.submit",
                      user_id=amqp_user[0], message_id="broken-1")  # fmt: skip
    async with client(stack, operator_token) as ops:
        await recorded(
            ops,
            {"type": "message.rejected"},
            lambda record: record["envelope"]["payload"]["message_id"] == "broken-1",
        )
        records, _ = await ops.events({"type": "message.rejected"})
        (record,) = [r for r in records if r["envelope"]["payload"]["message_id"] == "broken-1"]
        assert record["envelope"]["payload"]["queue"] == "scheduler.commands"
        assert "payload" in record["envelope"]["payload"]["reason"]
        # The broken command itself is in the trail too, as it arrived (not an envelope,
        # so it has no type to filter on).
        everything, _ = await ops.events({})
        (raw,) = [r for r in everything if r["id"] == "broken-1"]
        assert raw["valid"] is False and '"payload": 42' in raw["raw"]
