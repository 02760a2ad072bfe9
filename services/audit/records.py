"""What one audit record says about one delivery, and how readers get to see it.

The recorder keeps everything it is given, so decoding here never raises. A body that
is no medhive envelope (or one too big or odd for a document, or over the consumers'
size limit) is kept as a text excerpt with the reason; an envelope of an unknown type
or with a bad payload is kept whole with the reason. Both are `valid: false`.

Whose record it is comes from the sender RabbitMQ vouches for, never from the body:
a service account's valid message is filed under the tenant and job it names; an
integrator's, valid or not, under the tenant its AMQP user acts for and no job (what
it claims is unchecked); anything else under no tenant, for operators only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import bson
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from services.audit.chain import iso, to_millis
from shared.consume import summarize
from shared.envelope import Envelope, utcnow
from shared.identity import Sender
from shared.messages.catalog import CATALOG

#: How much of an undecodable body a record keeps.
RAW_EXCERPT_BYTES = 4096
#: Larger envelopes are kept as an excerpt: a MongoDB document holds 16 MiB at most.
MAX_ENVELOPE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Received:
    """One delivery, decoded, before it has its place (`seq`, hashes) in the chain."""

    id: str
    digest: str
    fields: dict[str, Any]

    @property
    def alt_id(self) -> str:
        """Where a different body that reuses a stored message's id is kept instead."""
        return f"{self.id}~{self.digest}"

    def record(self, record_id: str) -> dict[str, Any]:
        return {"_id": record_id, **self.fields}


def receive(message: AbstractIncomingMessage, sender: Sender, max_bytes: int) -> Received:
    """Decode a delivery as far as it goes, into the fields of its record."""
    digest = hashlib.sha256(message.body).hexdigest()
    if len(message.body) > max_bytes:
        error = f"message of {len(message.body)} bytes is over the limit of {max_bytes}"
        return _excerpt(message, digest, None, sender, error)
    try:
        envelope = Envelope.model_validate_json(message.body)
    except ValidationError as exc:
        return _excerpt(message, digest, None, sender, f"not a medhive envelope: {summarize(exc)}")
    dumped = envelope.model_dump(mode="json")
    try:
        size = len(bson.encode(dumped))
    except (bson.errors.BSONError, OverflowError, ValueError) as exc:
        error = f"cannot be stored as a document: {exc}"
        return _excerpt(message, digest, envelope, sender, error)
    if size > MAX_ENVELOPE_BYTES:
        error = f"envelope of {size} bytes is too large"
        return _excerpt(message, digest, envelope, sender, error)
    refusal = _refusal(envelope)
    fields = {**_claims(envelope, sender, valid=refusal is None), "envelope": dumped}
    return _received(message, str(envelope.id), digest, fields, refusal)


def _excerpt(
    message: AbstractIncomingMessage,
    digest: str,
    envelope: Envelope | None,
    sender: Sender,
    error: str,
) -> Received:
    """A record of a body kept only as its first bytes, as text."""
    if envelope is not None:
        fields = _claims(envelope, sender, valid=False)
    else:
        fields = _properties(message, sender)
    fields["envelope"] = None
    fields["raw"] = message.body[:RAW_EXCERPT_BYTES].decode("utf-8", "replace")
    record_id = (
        str(envelope.id) if envelope is not None else message.message_id or f"sha256:{digest}"
    )
    return _received(message, record_id, digest, fields, error)


def _received(
    message: AbstractIncomingMessage,
    record_id: str,
    digest: str,
    fields: dict[str, Any],
    error: str | None,
) -> Received:
    fields.update(
        routing_key=message.routing_key,
        exchange=message.exchange,
        # Set by the publisher, checked by RabbitMQ against the connection's user.
        user_id=message.user_id,
        recorded_at=to_millis(utcnow()),
        valid=error is None,
        error=error,
        body_sha256=digest,
    )
    return Received(record_id, digest, fields)


def _refusal(envelope: Envelope) -> str | None:
    """Why medhive's consumers would refuse this envelope, or None when they would not."""
    entry = CATALOG.get(envelope.type)
    if entry is None:
        return f"unknown message type {envelope.type!r}"
    if envelope.version != 1:
        return f"unsupported version {envelope.version} of {envelope.type}"
    try:
        entry.model.model_validate(envelope.payload)
    except ValidationError as exc:
        return f"invalid {envelope.type} payload: {summarize(exc)}"
    return None


def _claims(envelope: Envelope, sender: Sender, *, valid: bool) -> dict[str, Any]:
    """The envelope's own fields that records are searched by, believed as far as the
    sender may be believed."""
    believed = sender.service and valid
    return {
        "type": envelope.type,
        "tenant": envelope.tenant if believed else sender.tenant,
        "job_id": envelope.correlation_id if believed else None,
        "occurred_at": to_millis(envelope.occurred_at),
        "source": envelope.source,
        "actor": envelope.actor if believed else sender.user,
    }


def _properties(message: AbstractIncomingMessage, sender: Sender) -> dict[str, Any]:
    """For a body that is no envelope: what its AMQP properties claim."""
    sent = message.timestamp if isinstance(message.timestamp, datetime) else utcnow()
    return {
        "type": message.type,
        "tenant": sender.tenant,
        "job_id": message.correlation_id if sender.service else None,
        "occurred_at": to_millis(sent),
        "source": message.app_id,
        "actor": sender.user,
    }


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record as the API shows it: `id` for `_id`, times as ISO strings."""
    shown: dict[str, Any] = {"id": record["_id"]}
    for key, value in record.items():
        if key != "_id":
            shown[key] = iso(value) if isinstance(value, datetime) else value
    return shown
