"""Decoding a delivery into a record never fails: what is kept for each kind of body."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from services.audit import records
from services.audit.records import RAW_EXCERPT_BYTES, Received, public
from shared.envelope import Envelope
from shared.identity import Sender


def _delivery(body: bytes, **properties: Any) -> Any:
    """The parts of an aio-pika delivery that `receive` reads."""
    defaults = dict.fromkeys(
        ("message_id", "type", "correlation_id", "app_id", "timestamp", "user_id")
    )
    return SimpleNamespace(
        body=body, routing_key="job.x", exchange="medhive.events", **{**defaults, **properties}
    )


SERVICE = Sender("scheduler", service=True)
LIMIT = 1024 * 1024


def receive(delivery: Any, sender: Sender = SERVICE, limit: int = LIMIT) -> Received:
    return records.receive(delivery, sender, limit)


def _envelope(**fields: Any) -> Envelope:
    payload = {"job_id": "j1", "state": "queued"}
    base = {"id": uuid.uuid4(), "type": "job.queued", "tenant": "t1", "correlation_id": "j1"}
    return Envelope(**base | {"payload": payload} | fields)


def test_a_valid_envelope_is_kept_whole_under_its_id() -> None:
    envelope = _envelope()
    received = receive(_delivery(envelope.model_dump_json().encode(), user_id="scheduler"))
    record = received.record(received.id)
    assert record["_id"] == str(envelope.id)
    assert (record["valid"], record["error"]) == (True, None)
    assert (record["type"], record["tenant"], record["job_id"]) == ("job.queued", "t1", "j1")
    assert record["envelope"] == envelope.model_dump(mode="json")
    assert record["user_id"] == "scheduler"
    assert "raw" not in record


def test_an_envelope_the_consumers_would_refuse_is_kept_whole_but_tenantless() -> None:
    unknown = receive(_delivery(_envelope(type="job.exploded").model_dump_json().encode()))
    assert unknown.fields["valid"] is False
    assert "unknown message type" in unknown.fields["error"]
    assert unknown.fields["tenant"] is None
    assert unknown.fields["envelope"]["type"] == "job.exploded"

    bad_payload = _envelope(payload={"job_id": "j1", "state": "nonsense"})
    refused = receive(_delivery(bad_payload.model_dump_json().encode()))
    assert "invalid job.queued payload" in refused.fields["error"]


def test_a_body_that_is_no_envelope_is_kept_as_an_excerpt_with_the_reason() -> None:
    body = b"x" * (RAW_EXCERPT_BYTES + 100)
    sent = datetime(2025, 1, 31, 12, 0, 0)  # AMQP timestamps carry no zone
    received = receive(_delivery(body, message_id="m1", type="job.submit", timestamp=sent))
    assert received.id == "m1"
    fields = received.fields
    assert (fields["valid"], fields["envelope"], fields["tenant"]) == (False, None, None)
    assert fields["raw"] == "x" * RAW_EXCERPT_BYTES
    assert fields["type"] == "job.submit"
    assert fields["occurred_at"] == datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
    assert "not a medhive envelope" in fields["error"]


def test_a_body_without_any_id_is_keyed_by_its_digest() -> None:
    received = receive(_delivery(b"\xff\xfe"))
    assert received.id == "sha256:" + hashlib.sha256(b"\xff\xfe").hexdigest()
    assert received.fields["raw"] == "\ufffd\ufffd"


def test_an_envelope_no_document_can_hold_is_kept_as_an_excerpt() -> None:
    body = _envelope().model_dump_json().replace('"state":', '"huge":1' + "0" * 30 + ',"state":')
    received = receive(_delivery(body.encode()))
    assert received.fields["valid"] is False
    assert received.fields["envelope"] is None
    assert "cannot be stored" in received.fields["error"]
    assert received.fields["raw"] == body


def test_an_integrators_message_is_filed_under_its_own_tenant_whatever_it_claims() -> None:
    claim = _envelope(type="job.submit", tenant="cardiology", correlation_id="j-other",
                      actor="someone", payload={"spec": {"name": "x", "image": "i"}})  # fmt: skip
    ris = Sender("ris", tenant="radiology")
    record = receive(_delivery(claim.model_dump_json().encode(), user_id="ris"), ris).fields
    assert (record["valid"], record["tenant"]) == (True, "radiology")
    assert (record["job_id"], record["actor"]) == (None, "ris")

    refused = _envelope(type="node.run", tenant="cardiology", payload={})
    record = receive(_delivery(refused.model_dump_json().encode(), user_id="ris"), ris).fields
    assert (record["valid"], record["tenant"], record["job_id"]) == (False, "radiology", None)


def test_a_message_of_an_unknown_sender_is_filed_under_no_tenant() -> None:
    claim = _envelope(tenant="cardiology")
    stranger = Sender("stranger")
    record = receive(_delivery(claim.model_dump_json().encode()), stranger).fields
    assert (record["tenant"], record["job_id"], record["actor"]) == (None, None, "stranger")


def test_a_message_over_the_size_limit_is_kept_as_an_excerpt_with_the_reason() -> None:
    big = _envelope(payload={"job_id": "j1", "state": "queued", "reason": "x" * 5000})
    body = big.model_dump_json().encode()
    record = receive(_delivery(body, message_id=str(big.id)), limit=4096)
    assert record.id == str(big.id)
    assert record.fields["valid"] is False
    assert record.fields["envelope"] is None
    assert f"message of {len(body)} bytes is over the limit of 4096" == record.fields["error"]


def test_public_shows_id_and_iso_times() -> None:
    moment = datetime(2025, 1, 31, 12, 0, 0, 123000, tzinfo=UTC)
    shown = public({"_id": "m1", "seq": 3, "occurred_at": moment, "envelope": None})
    assert shown == {
        "id": "m1",
        "seq": 3,
        "occurred_at": "2025-01-31T12:00:00.123+00:00",
        "envelope": None,
    }
