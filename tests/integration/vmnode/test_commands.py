"""Who may command a node, and the node's presence on the bus."""

from __future__ import annotations

import aio_pika
import aiodocker
from aiohttp import ClientSession
from yarl import URL

from services.vmnode.settings import NodeSettings
from shared.bus import Bus
from shared.messages.catalog import COMMANDS
from shared.settings import AmqpSettings
from tests.integration.vmnode.conftest import (
    GATED,
    Events,
    containers_of,
    new_job,
    node_run,
    release,
    running_agent,
    send_run,
    sh,
)


async def test_run_from_an_untrusted_user_is_dead_lettered_and_starts_nothing(
    settings: NodeSettings,
    amqp_settings: AmqpSettings,
    broad_user: tuple[str, str],
    events: Events,
    docker: aiodocker.Docker,
) -> None:
    job = new_job()
    name, password = broad_user  # an integrator's own user could not even publish it
    url = URL(amqp_settings.url.get_secret_value()).with_user(name).with_password(password)
    sender = Bus(amqp_settings, "hospital@elsewhere")  # only to build the envelope
    envelope = sender.envelope("node.run", node_run(job, ["true"]), correlation_id=job)
    async with running_agent(settings):
        connection = await aio_pika.connect(str(url))
        channel = await connection.channel()
        exchange = await channel.get_exchange(COMMANDS, ensure=False)
        message = aio_pika.Message(
            envelope.model_dump_json().encode(), message_id=str(envelope.id), user_id=name
        )
        await exchange.publish(message, f"node.{settings.node_id}.run")
        await connection.close()
        rejected = await events.wait_for(
            "message.rejected", where=lambda e: e.payload["message_id"] == str(envelope.id)
        )
    assert rejected.payload["user_id"] == name
    assert rejected.payload["queue"] == f"node.{settings.node_id}"
    assert "scheduler only" in rejected.payload["reason"]
    assert [e for e in events.seen if e.type.startswith("run.")] == []
    assert await containers_of(docker, settings.node_id, job) == []


async def test_node_announces_itself_and_beats_with_its_capacity_and_runs(
    settings: NodeSettings, scheduler: Bus, events: Events, docker: aiodocker.Docker
) -> None:
    job = new_job()
    settings = settings.model_copy(update={"heartbeat_s": 0.2})
    async with running_agent(settings) as server:
        async with ClientSession() as http, http.get(server.make_url("/healthz")) as response:
            assert await response.json() == {"service": "vmnode", "status": "ok"}
        online = await events.wait_for("node.online")
        assert online.payload["running"] == []
        await send_run(scheduler, settings.node_id, node_run(job, sh(GATED)))
        started = await events.wait_for("run.started", job)
        beat = await events.wait_for("node.heartbeat", where=lambda e: e.payload["running"])
        await release(docker, started.payload["workload_id"])
        await events.wait_for("run.finished", job)
    offline = await events.wait_for("node.offline")
    for status in (online, beat, offline):
        assert status.payload["node_id"] == settings.node_id
        assert status.payload["cpus"] == 2
        assert status.payload["memory_mb"] == 2048
        assert status.payload["runtimes"] == ["container"]
        assert status.payload["heartbeat_s"] == 0.2
        assert status.payload["started_at"] == online.payload["started_at"]
    assert beat.payload["running"] == [job]
    kinds = [e.type for e in events.seen if e.type.startswith("node.")]
    assert kinds[0] == "node.online" and kinds[-1] == "node.offline"


async def test_instant_runtime_completes_at_once_without_docker(
    settings: NodeSettings, scheduler: Bus, events: Events, docker: aiodocker.Docker
) -> None:
    job = new_job()
    settings = settings.model_copy(update={"runtime": "instant"})
    async with running_agent(settings):
        await send_run(scheduler, settings.node_id, node_run(job, ["sleep", "600"]))
        finished = await events.wait_for("run.finished", job)
    assert finished.payload["outcome"] == "succeeded"
    assert finished.payload["exit_code"] == 0
    assert (await events.wait_for("run.started", job)).payload["workload_id"].startswith("instant-")
    assert await containers_of(docker, settings.node_id, job) == []
