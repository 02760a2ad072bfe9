"""Jobs submitted over AMQP by another hospital system, and what happens to bad ones."""

from __future__ import annotations

import json
import uuid

from aiohttp.test_utils import TestClient

from shared.envelope import Envelope
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import bearer, event_tap, make_token, publish_raw

SPEC = {"name": "from-ris", "image": "medhive/busybox:1", "command": ["true"]}


def submit_body(**envelope: object) -> bytes:
    fields = {
        "id": str(uuid.uuid4()),
        "type": "job.submit",
        "source": "ris@hospital",
        "payload": {"spec": SPEC},
    }
    return Envelope.model_validate({**fields, **envelope}).model_dump_json().encode()


def message_id(body: bytes) -> str:
    return str(json.loads(body)["id"])


def user_url(amqp: AmqpSettings, user: tuple[str, str]) -> str:
    base = amqp.url.get_secret_value()
    vhost = base.rsplit("/", 1)[1]
    return f"amqp://{user[0]}:{user[1]}@127.0.0.1:5672/{vhost}"


async def test_a_submit_from_a_mapped_amqp_user_becomes_a_job_of_its_tenant(
    scheduler: TestClient,
    amqp_settings: AmqpSettings,
    amqp_user: tuple[str, str],
    mongo_settings: MongoSettings,
) -> None:
    async with event_tap(amqp_settings, ["job.queued"]) as tap:
        body = submit_body(tenant="someone-else")  # a claimed tenant counts for nothing
        await publish_raw(user_url(amqp_settings, amqp_user), body, "job.submit",
                          user_id=amqp_user[0], message_id=message_id(body))  # fmt: skip
        queued = await tap.wait_for(lambda m: m["type"] == "job.queued")
    assert queued["tenant"] == "radiology"
    assert queued["actor"] == amqp_user[0]
    auth = bearer(await make_token(mongo_settings, "radiology"))
    job = await (await scheduler.get(f"/v1/jobs/{queued['correlation_id']}", headers=auth)).json()
    assert job["spec"]["name"] == "from-ris"


async def test_bad_messages_are_dead_lettered_with_a_reason_and_consuming_goes_on(
    scheduler: TestClient, amqp_settings: AmqpSettings, amqp_user: tuple[str, str]
) -> None:
    url = user_url(amqp_settings, amqp_user)
    user = amqp_user[0]
    schema = submit_body(payload={"spec": {**SPEC, "walltime_s": "forever"}})
    lax = submit_body(payload={"spec": {**SPEC, "walltime_s": "3600"}})  # strict, as HTTP
    unknown = submit_body(type="job.teleport")
    no_user = submit_body()
    no_id = json.dumps({"type": "job.submit", "payload": {"spec": SPEC}}).encode()
    cases = {
        "malformed": (b"{this is not json", {"user_id": user}, "not a medhive envelope"),
        message_id(schema): (schema, {"user_id": user}, "spec.walltime_s"),
        message_id(lax): (lax, {"user_id": user}, "spec.walltime_s"),
        message_id(unknown): (unknown, {"user_id": user}, "unknown message type"),
        message_id(no_user): (no_user, {}, "no user_id"),
        "no-id": (no_id, {"user_id": user}, "id: Field required"),
        "other-id": (submit_body(), {"user_id": user}, "message_id property differs"),
    }
    async with event_tap(amqp_settings, ["message.rejected", "job.queued"]) as tap:
        for name, (body, props, _) in cases.items():
            await publish_raw(url, body, "job.submit", message_id=name, **props)
        for name, (_, _, reason) in cases.items():
            event = await tap.wait_for(
                lambda m, n=name: (
                    m["type"] == "message.rejected" and m["payload"]["message_id"] == n
                )
            )
            assert reason in event["payload"]["reason"], name
            assert event["payload"]["queue"] == "scheduler.commands"
        # The consumer is still there: a good message after the bad ones becomes a job.
        good = submit_body()
        await publish_raw(url, good, "job.submit", user_id=user, message_id=message_id(good))
        await tap.wait_for(lambda m: m["type"] == "job.queued")

    dead = await _dead_letters(amqp_settings)
    assert {m["message_id"] for m in dead} >= set(cases)
    assert all(m["reason"] for m in dead)


async def test_an_unmapped_amqp_user_is_refused(
    scheduler: TestClient, amqp_settings: AmqpSettings
) -> None:
    async with event_tap(amqp_settings, ["message.rejected"]) as tap:
        # The service account is a real, validated user, but not mapped to a tenant.
        body = submit_body()
        await publish_raw(amqp_settings.url.get_secret_value(), body, "job.submit",
                          user_id="medhive", message_id=message_id(body))  # fmt: skip
        event = await tap.wait_for(lambda m: m["type"] == "message.rejected")
    assert "not mapped to a tenant" in event["payload"]["reason"]


async def _dead_letters(amqp: AmqpSettings) -> list[dict[str, str]]:
    import aio_pika

    connection = await aio_pika.connect(amqp.url.get_secret_value())
    out = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue("medhive.dead", ensure=False)
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            headers = message.headers or {}
            out.append(
                {
                    "message_id": message.message_id or "",
                    "reason": str(headers.get("x-medhive-reason", "")),
                    "body": json.dumps(message.body.decode("utf-8", "replace")),
                }
            )
    return out
