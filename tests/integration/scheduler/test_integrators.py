"""Other hospital systems on the bus, each provisioned as `medhive amqp-user add` does:
what RabbitMQ lets one see and do, and what medhive makes of its commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aiormq
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from medhive import integrators
from medhive.dead import dead_letters, describe
from services.audit.app import create_app as create_audit_app
from services.audit.settings import AuditSettings
from shared.auth import Role
from shared.messages.nodes import RunFinished, RunStarted
from shared.settings import AmqpSettings, MongoSettings
from tests.conftest import provisioning, rabbit_api
from tests.helpers import EventTap, bearer, event_tap, eventually, make_token, publish_raw
from tests.integration.scheduler.support import pretend

SPEC = {"name": "from-ris", "image": "medhive/busybox:1", "command": ["true"]}
Provision = Callable[..., Awaitable[tuple[str, str]]]
#: Content of another sender's messages that must never reach this integrator.
SECRET = "Patient DOE^JANE 1970-01-01"


def submit(spec: dict[str, Any] | None = None, **envelope: Any) -> tuple[str, bytes]:
    """A `job.submit` body as another system writes it; returns (id, body)."""
    body = {
        "id": str(uuid.uuid4()),
        "type": "job.submit",
        "version": 1,
        "source": "ris@hospital",
        "payload": {"spec": spec or SPEC},
        **envelope,
    }
    return body["id"], json.dumps(body).encode()


def url_of(amqp: AmqpSettings, user: tuple[str, str]) -> str:
    base = URL(amqp.url.get_secret_value())
    return str(base.with_user(user[0]).with_password(user[1]))


async def send(amqp: AmqpSettings, user: tuple[str, str], body: bytes, **props: Any) -> None:
    """Publish as the integrator, `user_id` and `message_id` set as the README says."""
    message_id = props.pop("message_id", None) or json.loads(body).get("id")
    await publish_raw(url_of(amqp, user), body, "job.submit", user_id=user[0],
                      message_id=message_id, **props)  # fmt: skip


@pytest.fixture
async def provision(
    amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> AsyncIterator[Callable[[str], Awaitable[tuple[str, str]]]]:
    """Makes integrators as `medhive amqp-user add` does; deletes their users after."""
    made: list[str] = []

    async def make(tenant: str, prefix: str | None = None) -> tuple[str, str]:
        name = f"{prefix or tenant}-{uuid.uuid4().hex[:6]}"
        async with provisioning(amqp_settings, mongo_settings) as (api, users):
            url = await integrators.add(api, users, name, tenant)
        made.append(name)
        return name, str(URL(url).password)

    yield make
    for name in made:
        with contextlib.suppress(urllib.error.URLError):
            rabbit_api("DELETE", f"/users/{name}")


@asynccontextmanager
async def own_queue(amqp: AmqpSettings, user: tuple[str, str]) -> AsyncIterator[EventTap]:
    """What the integrator reads from its own durable queue."""
    connection = await aio_pika.connect(url_of(amqp, user))
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(integrators.integrator_queue(user[0]), ensure=False)
        tap = EventTap()
        await queue.consume(tap._on)
        yield tap
    finally:
        await connection.close()


async def jobs_of(scheduler: TestClient, mongo: MongoSettings, tenant: str) -> list[Any]:
    auth = bearer(await make_token(mongo, tenant))
    return list((await (await scheduler.get("/v1/jobs", headers=auth)).json())["jobs"])


async def test_an_integrator_can_bind_nothing_but_its_own_tenants_events(
    scheduler: TestClient, amqp_settings: AmqpSettings, amqp_user: tuple[str, str]
) -> None:
    exchanges = [x["name"] for x in rabbit_api("GET", f"/exchanges/{amqp_settings.vhost}")]  # type: ignore[union-attr,index]
    assert {"medhive.commands", "medhive.events", "medhive.tenants", "medhive.dead"} <= set(
        exchanges
    )
    bound = []
    connection = await aio_pika.connect(url_of(amqp_settings, amqp_user))
    async with connection:
        for exchange in filter(None, exchanges):  # "" (the default) takes no bindings
            for key in ("#", "*.#", "cardiology.#", "*.job.*", "job.#", "radiology"):
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(exclusive=True)
                    await queue.bind(exchange, key)
                    bound.append((exchange, key))
                except aiormq.exceptions.ChannelAccessRefused:
                    continue
                await channel.close()
        # Its own tenant's keys it may bind; and it may not publish what services send.
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind("medhive.tenants", "radiology.#")
        channel = await connection.channel(publisher_confirms=True)
        commands = await channel.get_exchange("medhive.commands", ensure=False)
        try:
            await commands.publish(aio_pika.Message(b"{}", user_id=amqp_user[0]), "node.n1.run")
            refused = False
        except aiormq.exceptions.ChannelAccessRefused:
            refused = True
    assert bound == []
    assert refused


async def test_each_integrator_follows_its_own_jobs_and_rejections_and_nothing_else(
    scheduler: TestClient,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    amqp_user: tuple[str, str],
    provision: Provision,
) -> None:
    """Two systems of two tenants at once; one sees the other's nothing, not even the
    names in its refused messages."""
    ris = amqp_user  # radiology
    cardio = await provision("cardiology")  # after the scheduler started
    async with (
        pretend(amqp_settings) as (node_bus, node_commands),
        own_queue(amqp_settings, ris) as seen_by_ris,
        own_queue(amqp_settings, cardio) as seen_by_cardio,
    ):
        theirs_id, theirs = submit({**SPEC, "name": "cardio-job", "labels": {"who": SECRET}})
        await send(amqp_settings, cardio, theirs)
        bad_theirs = json.dumps({"id": str(uuid.uuid4()), "type": "job.submit",
                                 "payload": {"spec": {"name": SECRET}}}).encode()  # fmt: skip
        await send(amqp_settings, cardio, bad_theirs)
        mine_id, mine = submit(tenant="cardiology")  # a claim that counts for nothing
        await send(amqp_settings, ris, mine)
        bad_mine_id, bad_mine = submit({**SPEC, "walltime_s": "forever"})
        await send(amqp_settings, ris, bad_mine)

        queued = await seen_by_ris.wait_for(lambda m: m["type"] == "job.queued")
        job_id = queued["correlation_id"]
        assert queued["causation_id"] == mine_id
        run = await node_commands.wait_for(
            lambda m: m["type"] == "node.run" and m["correlation_id"] == job_id
        )
        started = RunStarted(job_id=job_id, attempt=1, node_id="n1", workload_id="c1")
        await node_bus.emit("run.started", started, correlation_id=job_id)
        done = RunFinished(job_id=job_id, attempt=1, node_id="n1", outcome="succeeded")
        await node_bus.emit("run.finished", done, correlation_id=job_id)
        await seen_by_ris.wait_for(lambda m: m["type"] == "job.succeeded")
        refused = await seen_by_ris.wait_for(lambda m: m["type"] == "command.rejected")
        # The other tenant's system got its own, so both streams were flowing.
        await seen_by_cardio.wait_for(lambda m: m["type"] == "job.queued")
        await seen_by_cardio.wait_for(lambda m: m["type"] == "command.rejected")

    assert run["tenant"] == "radiology"
    types = [m["type"] for m in seen_by_ris.of_job(job_id)]
    assert types == [f"job.{s}" for s in ("submitted", "queued", "dispatched", "running",
                                          "succeeded")]  # fmt: skip
    assert all(m["causation_id"] for m in seen_by_ris.of_job(job_id))
    assert refused["payload"]["message_id"] == bad_mine_id
    assert "spec.walltime_s" in refused["payload"]["reason"]
    assert "body_excerpt" not in refused["payload"]
    everything = json.dumps(seen_by_ris.messages)
    assert {m["tenant"] for m in seen_by_ris.messages} == {"radiology"}
    assert SECRET not in everything and theirs_id not in everything
    assert [m["tenant"] for m in seen_by_cardio.messages] == ["cardiology"] * len(
        seen_by_cardio.messages
    )
    assert [j["name"] for j in await jobs_of(scheduler, mongo_settings, "cardiology")] == [
        "cardio-job"
    ]


async def test_the_audit_files_an_integrators_messages_under_its_real_tenant(
    scheduler: TestClient,
    aiohttp_client: Any,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    db_prefix: str,
    amqp_user: tuple[str, str],
) -> None:
    audit = await aiohttp_client(
        create_audit_app(AuditSettings(amqp=amqp_settings, mongo=mongo_settings,
                                       database=f"{db_prefix}audit"))
    )  # fmt: skip
    spoofed_id, spoofed = submit(tenant="cardiology", actor="dr-somebody-else")
    await send(amqp_settings, amqp_user, spoofed)
    over = b'{"id": "' + str(uuid.uuid4()).encode() + b'", "pad": "' + b"x" * (1 << 20) + b'"}'
    await send(amqp_settings, amqp_user, over, message_id="too-big")

    radiology = bearer(await make_token(mongo_settings, "radiology"))
    cardiology = bearer(await make_token(mongo_settings, "cardiology"))
    operator = bearer(await make_token(mongo_settings, "ops", Role.operator))

    async def record(message_id: str) -> Any:
        response = await audit.get("/v1/events", headers=operator)
        found = [r for r in (await response.json())["events"] if r["id"] == message_id]
        return found[0] if found else None

    async def stored() -> bool:
        return await record(spoofed_id) is not None and await record("too-big") is not None

    await eventually(stored)
    command = await record(spoofed_id)
    assert (command["tenant"], command["actor"], command["user_id"]) == (
        "radiology", amqp_user[0], amqp_user[0]
    )  # fmt: skip
    big = await record("too-big")
    assert big["valid"] is False and "over the limit of 1048576" in big["error"]
    assert big["tenant"] == "radiology"

    mine = (await (await audit.get("/v1/events", headers=radiology)).json())["events"]
    assert spoofed_id in {r["id"] for r in mine}
    theirs = (await (await audit.get("/v1/events", headers=cardiology)).json())["events"]
    assert theirs == []


async def test_one_job_per_command_and_a_repeat_is_answered_with_the_job(
    scheduler: TestClient,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    amqp_user: tuple[str, str],
) -> None:
    first_id, body = submit()
    keyed_id, keyed = submit({**SPEC, "idempotency_key": "order-4711"})
    _, keyed_again = submit({**SPEC, "idempotency_key": "order-4711"})
    async with own_queue(amqp_settings, amqp_user) as seen:
        # Both copies are in the queue before the first is handled.
        connection = await aio_pika.connect(url_of(amqp_settings, amqp_user))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            commands = await channel.get_exchange("medhive.commands", ensure=False)
            await asyncio.gather(*(
                commands.publish(aio_pika.Message(b, user_id=amqp_user[0],
                                                  message_id=json.loads(b)["id"]), "job.submit")
                for b in (body, body, keyed)
            ))  # fmt: skip
        await send(amqp_settings, amqp_user, keyed_again)
        repeats = [
            await seen.wait_for(
                lambda m, c=cause: m["type"] == "job.duplicate" and m["causation_id"] == c
            )
            for cause in (first_id, json.loads(keyed_again)["id"])
        ]
        made = {
            m["causation_id"]: m["correlation_id"]
            for m in seen.messages
            if m["type"] == "job.submitted"
        }
    assert set(made) == {first_id, keyed_id}
    assert repeats[0]["payload"]["job_id"] == made[first_id]
    assert repeats[0]["payload"]["matched_by"] == "message_id"
    assert repeats[1]["payload"]["job_id"] == made[keyed_id]
    assert repeats[1]["payload"]["matched_by"] == "idempotency_key"
    assert len(await jobs_of(scheduler, mongo_settings, "radiology")) == 2


async def test_dead_letters_are_bounded_keep_their_sender_and_can_be_replayed(
    scheduler: TestClient,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    provision: Provision,
) -> None:
    """A system whose user was not mapped yet: its command waits in the dead letters
    until an operator maps the user and replays it."""
    late = await provision("radiology", "late")
    name = late[0]
    async with provisioning(amqp_settings, mongo_settings) as (_, users):
        await users.remove(name)  # RabbitMQ user and permissions stay; no tenant
    command_id, body = submit()
    async with event_tap(amqp_settings, ["message.rejected"]) as rejected:
        await send(amqp_settings, late, body)
        await rejected.wait_for(lambda m: m["payload"]["message_id"] == command_id)

    queue = rabbit_api("GET", f"/queues/{amqp_settings.vhost}/medhive.dead")
    assert isinstance(queue, dict)
    assert queue["arguments"]["x-max-length"] == 10_000
    assert queue["arguments"]["x-message-ttl"] == 14 * 24 * 3600 * 1000
    async with dead_letters(amqp_settings) as dead:
        letters = [describe(m) for m in await dead.take(100)]
    letter = next(row for row in letters if row["message_id"] == command_id)
    assert (letter["user_id"], letter["type"]) == (name, None)
    assert "not mapped to a tenant" in letter["reason"]
    assert (letter["exchange"], letter["routing_key"]) == ("medhive.commands", "job.submit")

    async with provisioning(amqp_settings, mongo_settings) as (_, users):
        await users.add(name, "radiology")
    async with event_tap(amqp_settings, ["job.queued"]) as tap, dead_letters(amqp_settings) as dead:
        for message in await dead.take(100):
            if message.message_id == command_id:
                await dead.replay(message)
        queued = await tap.wait_for(lambda m: m["causation_id"] == command_id)
    assert (queued["tenant"], queued["actor"]) == ("radiology", name)


async def test_the_cli_adds_a_user_that_works_at_once_and_removing_it_disconnects_it(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    env = {
        **os.environ,
        "MEDHIVE_AMQP_URL": amqp_settings.url.get_secret_value(),
        "MEDHIVE_MONGO_URL": mongo_settings.url.get_secret_value(),
        "MEDHIVE_MONGO_IDENTITY_DB": mongo_settings.identity_db,
    }
    name = f"portal-{uuid.uuid4().hex[:6]}"

    def medhive(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "medhive", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        return done.stdout

    url = await asyncio.to_thread(medhive, "amqp-user", "add", name, "--tenant", "oncology")
    url = url.strip()
    assert URL(url).user == name
    listed = await asyncio.to_thread(medhive, "amqp-user", "list")
    assert f"{name}  tenant oncology" in listed

    command_id, body = submit()
    async with event_tap(amqp_settings, ["job.queued"]) as tap:  # no restart in between
        await publish_raw(url, body, "job.submit", user_id=name, message_id=command_id)
        queued = await tap.wait_for(lambda m: m["causation_id"] == command_id)
    assert queued["tenant"] == "oncology"

    connection = await aio_pika.connect(url)
    closed = asyncio.Event()
    connection.close_callbacks.add(lambda *_: closed.set())
    await asyncio.to_thread(medhive, "amqp-user", "remove", name)
    await asyncio.wait_for(closed.wait(), 30)
    assert rabbit_api("GET", "/users") is not None
    assert name not in {u["name"] for u in rabbit_api("GET", "/users")}  # type: ignore[union-attr,index]
