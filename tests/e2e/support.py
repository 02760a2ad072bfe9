"""What the end-to-end tests do through the public APIs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from medhive.client import TERMINAL, Client
from shared.envelope import Envelope
from shared.messages.jobs import JobSpec, JobSubmit
from shared.settings import AmqpSettings, MongoSettings
from tests.conftest import TEST_IMAGE, free_port
from tests.helpers import publish_raw
from tests.integration.datacache.http_origin import Origin, serve_origin
from tests.processes import Stack

GUEST_DIR = Path(os.environ.get("MEDHIVE_TEST_GUEST_DIR", "/var/lib/medhive/guest"))
#: The libvirt daemon the end-to-end VM tests' node agents use.
URI = "qemu:///system"


def virsh(*args: str) -> str:
    done = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True)
    return done.stdout


def domains_of(node_id: str) -> list[str]:
    """The medhive domains libvirt holds for `node_id` (running or not)."""
    names = [n for n in virsh("list", "--all", "--name").split() if n.startswith("medhive-")]
    return [n for n in names if f'"node_id": "{node_id}"' in virsh("dumpxml", n)]


@contextlib.asynccontextmanager
async def origin_of(stack: Stack, files: dict[str, bytes]) -> AsyncIterator[Origin]:
    """An HTTP source serving `files` behind a token, configured in the stack's datacache
    for the tenant of the `user_token` fixture."""
    async with serve_origin(Origin(files=files, token="s3cret")) as origin:
        await stack.configure_sources(
            [{"tenant": "radiology", "match": origin.url, "token": "s3cret"}]
        )
        yield origin


def spec(name: str, *command: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": TEST_IMAGE, "command": list(command), **fields}


def client(stack: Stack, token: str) -> Client:
    return Client(stack.api, stack.audit, token)


async def recorded(
    reader: Client,
    filters: dict[str, str],
    wanted: Callable[[dict[str, Any]], bool],
    within: float = 30,
) -> dict[str, Any]:
    """The first audit record that `filters` select and `wanted` accepts, stored already
    or to come: the live stream is read from the start of the trail (`after=0`), so a
    record stored before it opened is found as surely as one stored after."""
    trail = reader.stream(filters, after=0)
    async with asyncio.timeout(within), contextlib.aclosing(trail):
        async for record in trail:
            if wanted(record):
                return record
    raise AssertionError("Client.stream ended; it reconnects until it is closed")


async def wait_state(
    api: Client, job_id: str, states: set[str] = TERMINAL, within: float = 60
) -> dict[str, Any]:
    """Wait for the job's `job.<state>` event of one of `states` in the audit trail, then
    return the job as the API shows it: in that state (the scheduler stores a state
    before it announces it), unless the job has left it since, which fails here."""
    events = {f"job.{state}" for state in states}
    trail = {"job": job_id, "type": "job."}
    await recorded(api, trail, lambda record: record["type"] in events, within)
    job = await api.job(job_id)
    assert job["state"] in states, f"the job left {sorted(states)} before it was seen: {job}"
    return job


async def submit_over_amqp(amqp: AmqpSettings, user: tuple[str, str], job: dict[str, Any]) -> str:
    """Publish `job.submit` as another hospital system would; returns the message id."""
    envelope = Envelope(
        id=uuid.uuid4(),
        type="job.submit",
        source="ris@hospital",
        payload=JobSubmit(spec=JobSpec.model_validate(job)).model_dump(mode="json"),
    )
    vhost = amqp.url.get_secret_value().rsplit("/", 1)[1]
    url = f"amqp://{user[0]}:{user[1]}@127.0.0.1:5672/{vhost}"
    await publish_raw(url, envelope.model_dump_json().encode(), "job.submit",
                      user_id=user[0], message_id=str(envelope.id))  # fmt: skip
    return str(envelope.id)


async def job_of_message(message_id: str, operator: Client) -> str:
    """The job an AMQP submission became (its job.submitted names the message as cause)."""
    submitted = await recorded(
        operator,
        {"type": "job.submitted"},
        lambda record: record["envelope"]["causation_id"] == message_id,
    )
    return str(submitted["job_id"])


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def all_records(ops: Client, filters: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every audit record (that `filters` select), page by page."""
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        records, next_after = await ops.events(filters or {}, after)
        out.extend(records)
        if next_after is None:
            return out
        after = next_after


@contextlib.asynccontextmanager
async def instant_stack(
    amqp_url: str, mongo: MongoSettings, db_prefix: str, logs: Path, agents: int = 2, **env: str
) -> AsyncIterator[Stack]:
    """Scheduler, audit and `agents` node agents whose workloads end at once (the
    instant runtime): the control plane alone, on the broker and database given."""
    node_id = f"node-{db_prefix.rstrip('_')}"
    audit_port = str(free_port())
    stack = Stack(
        {
            **os.environ,
            "MEDHIVE_AMQP_URL": amqp_url,
            "MEDHIVE_MONGO_URL": mongo.url.get_secret_value(),
            "MEDHIVE_MONGO_IDENTITY_DB": mongo.identity_db,
            "MEDHIVE_SCHEDULER_DATABASE": f"{db_prefix}scheduler",
            "MEDHIVE_SCHEDULER_PORT": str(free_port()),
            "MEDHIVE_AUDIT_DATABASE": f"{db_prefix}audit",
            "MEDHIVE_AUDIT_PORT": audit_port,
            "MEDHIVE_SCHEDULER_AUDIT_URL": f"http://127.0.0.1:{audit_port}",
            "MEDHIVE_VMNODE_RUNTIME": "instant",
            "MEDHIVE_VMNODE_HEARTBEAT_S": "1",
            "MEDHIVE_VMNODE_CPUS": "2",
            "MEDHIVE_VMNODE_MEMORY_MB": "2048",
            "MEDHIVE_VMNODE_WORK_DIR": str(logs / "jobs"),
            **env,
        },
        logs,
        node_id,
    )
    try:
        await stack.start("audit")
        await stack.start("scheduler")
        for agent in "ab"[:agents]:
            await stack.start(
                f"vmnode-{agent}", "vmnode",
                MEDHIVE_VMNODE_NODE_ID=f"{node_id}-{agent}",
                MEDHIVE_VMNODE_PORT=str(free_port()),
            )  # fmt: skip
        yield stack
    finally:
        for name in list(stack.processes):
            stack.stop(name)
