"""A real three-node RabbitMQ cluster (`scripts/rabbit-cluster.sh`) loses nodes.

The whole platform: the node that leads the scheduler's queues is lost, and later
another, while jobs flow: every service moves to a surviving node by itself (no
restart), every job ends exactly once, and the audit holds every event once, in one
chain that verifies. The test reports how long no job started, and bounds it. And the
bus alone: a message refused while its queue elects a new leader is published again."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import signal
import subprocess
import urllib.error
import urllib.parse
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from pydantic import SecretStr

from medhive.client import TERMINAL
from services.datacache.crypto import LocalKeyProvider
from shared.auth import Role
from shared.bus import Bus
from shared.messages.catalog import EVENTS
from shared.messages.nodes import NodeStatus
from shared.settings import AmqpSettings, MongoSettings
from shared.topology import declare_exchanges, declare_queue
from tests.conftest import RABBIT_ADMIN, free_port, rabbit_api
from tests.e2e.support import all_records, client, instant_stack, spec
from tests.helpers import eventually, make_token
from tests.processes import Stack

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbit-cluster.sh"
#: Where `scripts/rabbit-cluster.sh` keeps node i's data (its pid file among them).
NODE_DIR = Path("/var/lib/rabbitmq/medhive-ha")
NODES = (1, 2, 3)
#: Jobs offered, and how many a second.
JOBS, RATE = 300, 15
#: The longest no job may start while a broker node is lost (the bound asserted).
MAX_GAP_S = 30.0
#: The scheduler's queues: their leader is the node lost first.
SCHEDULER_QUEUE = "scheduler.reports"


def amqp_port(node: int) -> int:
    return 5680 + node


def cluster_api(method: str, path: str, body: object | None = None) -> Any:
    """The management API of whichever node answers (any node speaks for the cluster)."""
    error: Exception | None = None
    for node in NODES:
        try:
            return rabbit_api(method, path, body, base=f"http://127.0.0.1:{15680 + node}/api")
        except (urllib.error.URLError, ConnectionError) as exc:
            error = exc
    raise AssertionError(f"no node of the cluster answers: {error}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    subprocess.run(["bash", str(SCRIPT), "start"], check=True, timeout=300)
    yield
    subprocess.run(["bash", str(SCRIPT), "stop"], check=False, timeout=120)


@pytest.fixture
def cluster_vhost(cluster: None) -> Iterator[str]:
    """A fresh vhost on the cluster, every node running (a test before may have lost one)."""
    subprocess.run(["bash", str(SCRIPT), "start"], check=True, timeout=300)
    name = f"test-ha-{uuid.uuid4().hex[:12]}"
    cluster_api("PUT", f"/vhosts/{name}")
    user = RABBIT_ADMIN.split(":", 1)[0]
    permissions = {"configure": ".*", "write": ".*", "read": ".*"}
    cluster_api("PUT", f"/permissions/{name}/{user}", permissions)
    yield name
    cluster_api("DELETE", f"/vhosts/{name}")


@pytest.fixture
async def cluster_stack(
    cluster_vhost: str, mongo_settings: MongoSettings, db_prefix: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    """The control plane and the datacache, every service given node 1's URL first and
    the other two nodes to move to."""
    key_file = tmp_path / "master.key"
    LocalKeyProvider.generate_key_file(key_file)
    sources = tmp_path / "sources.yaml"
    sources.write_text("sources: []\n")
    async with instant_stack(
        f"amqp://{RABBIT_ADMIN}@127.0.0.1:{amqp_port(1)}/{cluster_vhost}",
        mongo_settings, db_prefix, tmp_path,
        MEDHIVE_AMQP_NODES=f"127.0.0.1:{amqp_port(2)},127.0.0.1:{amqp_port(3)}",
        MEDHIVE_SCHEDULER_NODE_TIMEOUT_S="30",
        MEDHIVE_DATACACHE_DATABASE=f"{db_prefix}datacache",
        MEDHIVE_DATACACHE_PORT=str(free_port()),
        MEDHIVE_DATACACHE_CACHE_DIR=str(tmp_path / "cache"),
        MEDHIVE_DATACACHE_MASTER_KEY_FILE=str(key_file),
        MEDHIVE_DATACACHE_SOURCES_FILE=str(sources),
    ) as stack:  # fmt: skip
        await stack.start("datacache")
        yield stack


def leader(vhost: str, queue: str = SCHEDULER_QUEUE) -> int:
    """The node that leads a quorum queue (by default the scheduler's report queue)."""
    found = cluster_api("GET", f"/queues/{urllib.parse.quote(vhost, safe='')}/{queue}")
    return node_of(found["leader"])


def scheduler_connected_to(vhost: str) -> int:
    """The node the scheduler's connection is on."""
    connections = cluster_api("GET", f"/vhosts/{urllib.parse.quote(vhost, safe='')}/connections")
    names = {
        c["node"]
        for c in connections
        if c["client_properties"].get("connection_name", "").startswith("scheduler")
    }
    assert len(names) == 1, names
    return node_of(names.pop())


def node_of(name: str) -> int:
    """`medhive-ha2@host` -> 2."""
    return int(name.split("@", 1)[0].removeprefix("medhive-ha"))


def kill_node(node: int) -> None:
    """SIGKILL of the node's Erlang VM: no goodbye to clients or to the other nodes."""
    pid = int((NODE_DIR / f"ha{node}" / "pid").read_text())
    os.kill(pid, signal.SIGKILL)


def consumed_queues(vhost: str) -> set[str]:
    """The queues that have a consumer."""
    queues = cluster_api("GET", f"/queues/{urllib.parse.quote(vhost, safe='')}")
    return {q["name"] for q in queues if q.get("consumers", 0) >= 1}


def every_queue_whole(vhost: str) -> bool:
    """Every quorum queue has all three members online (a restarted node caught up)."""
    queues = cluster_api("GET", f"/queues/{urllib.parse.quote(vhost, safe='')}")
    quorum = [q for q in queues if q.get("type") == "quorum"]
    return bool(quorum) and all(len(q.get("online", [])) == len(NODES) for q in quorum)


async def test_losing_broker_nodes_loses_no_job_and_no_event(
    cluster_stack: Stack, cluster_vhost: str, mongo_settings: MongoSettings
) -> None:
    stack = cluster_stack
    user_token = await make_token(mongo_settings, "radiology", Role.user)
    operator_token = await make_token(mongo_settings, "ops", Role.operator)
    pids = {name: process.pid for name, process in stack.processes.items()}
    submitted: list[str] = []

    async def offer(api: Any) -> None:
        """A steady offered load, as hospital systems submit (the pace is the load)."""
        for i in range(JOBS):
            submitted.append((await api.submit(spec(f"ha-{i}", "true")))["id"])
            await asyncio.sleep(1 / RATE)

    async with client(stack, user_token) as api, client(stack, operator_token) as ops:

        async def started() -> int:
            records, _ = await ops.events({"type": "job.running"})
            return len(records)

        offering = asyncio.create_task(offer(api))
        await eventually(functools.partial(_at_least, started, 20), within=60)
        lost: list[int] = []
        # First the leader of the scheduler's queues, on which every service is (all are
        # given node 1 first); once it is back, the node the scheduler has moved to.
        for choose in (leader, scheduler_connected_to):
            lost.append(await asyncio.to_thread(choose, cluster_vhost))
            kill_node(lost[-1])
            before = await started()
            await eventually(functools.partial(_at_least, started, before + 20), within=90)
            await asyncio.to_thread(
                subprocess.run, ["bash", str(SCRIPT), "start"], check=True, timeout=300
            )
            await eventually(lambda: asyncio.to_thread(every_queue_whole, cluster_vhost), 120)
        await offering

        async def all_ended() -> bool:
            states = [(await api.job(job))["state"] for job in submitted]
            return all(state in TERMINAL for state in states)

        await eventually(all_ended, within=120)

        async def every_end_recorded() -> bool:
            # Stored as the relay publishes: an event deferred while a node was lost
            # is published by the relay's next retry, seconds later.
            ended = {r["job_id"] for r in await all_records(ops, {"type": "job.succeeded"})}
            return set(submitted) <= ended

        await eventually(every_end_recorded, within=60)
        # Every service consumes again, the datacache too (no job here needs it).
        agents = {f"node.{stack.node_id}-{agent}" for agent in "ab"}
        consumers = {"scheduler.commands", "scheduler.reports", "audit.all", *agents}
        consumers.add("datacache.commands")

        def all_consume() -> bool:
            return consumers <= consumed_queues(cluster_vhost)

        await eventually(lambda: asyncio.to_thread(all_consume), within=60)
        jobs = [await api.job(job) for job in submitted]
        records = await all_records(ops)
        verified = await ops.verify()

    assert lost[0] == 1 and lost[1] != 1, lost
    assert {job["state"] for job in jobs} == {"succeeded"}
    ends = Counter(r["job_id"] for r in records if r["type"] == "job.succeeded")
    assert set(ends) == set(submitted) and set(ends.values()) == {1}, "a job ended twice"
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "an audit record was stored twice"
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert verified["ok"], verified
    assert {name: p.pid for name, p in stack.processes.items() if p.poll() is None} == pids

    starts = sorted(
        datetime.fromisoformat(r["occurred_at"]) for r in records if r["type"] == "job.running"
    )
    gap_s = max((b - a).total_seconds() for a, b in itertools.pairwise(starts))
    print(f"longest time with no job started: {gap_s:.1f} s (nodes lost: {lost})")
    assert gap_s <= MAX_GAP_S, f"no job started for {gap_s:.1f} s"


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)


async def test_a_message_refused_while_its_queue_elects_a_leader_is_published_again(
    cluster_vhost: str,
) -> None:
    url = f"amqp://{RABBIT_ADMIN}@127.0.0.1:{{port}}/{cluster_vhost}"
    # A queue declared through node 1 is led by node 1; the bus publishes through node 2.
    declaring = await aio_pika.connect(url.format(port=amqp_port(1)))
    channel = await declaring.channel()
    exchanges = await declare_exchanges(channel)
    await declare_queue(channel, "probe", [(EVENTS, "node.heartbeat")], exchanges, 5)
    assert leader(cluster_vhost, "probe") == 1
    bus = Bus(AmqpSettings(url=SecretStr(url.format(port=amqp_port(2)))), "probe@test")
    await bus.connect()
    try:
        kill_node(1)
        status = NodeStatus(node_id="probe", cpus=1, memory_mb=1, heartbeat_s=1,
                            started_at=datetime.now(UTC))  # fmt: skip
        envelope = bus.envelope("node.heartbeat", status)
        # Published at once, the message meets the queue without a leader: refused.
        # RabbitMQ refuses on that channel for minutes after; the bus takes a new one.
        await bus.publish(envelope, deadline_s=60)
    finally:
        await bus.close()
    reading = await aio_pika.connect(url.format(port=amqp_port(3)))
    try:
        queue = await (await reading.channel()).get_queue("probe")
        message = await queue.get(timeout=10)
        assert message is not None and message.message_id == str(envelope.id)
    finally:
        await reading.close()
