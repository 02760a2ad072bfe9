"""The one envelope every medhive message travels in (README, "Other hospital systems on
the bus").

The envelope is deliberately loose about `payload` (a JSON object): each message type's
payload model lives in `shared.messages`, and the consumer boundary validates the
payload against the catalog entry for `type`, once.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

#: The namespace of ids derived from what a message is about (`derived_id`).
_DERIVED = uuid.UUID("5b0f3c2e-6d1a-4e8b-9a57-0c6f1d2e8a41")


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the messages use."""
    return datetime.now(UTC)


def derived_id(*parts: object) -> uuid.UUID:
    """The same id for the same fact, e.g. `derived_id("run.started", job, attempt)`.

    A fact that may be announced more than once (a crash between publishing and
    remembering it, a redelivered command) keeps one id, so that every consumer's
    de-duplication by message id recognises the repeat.
    """
    return uuid.uuid5(_DERIVED, "/".join(str(part) for part in parts))


class Envelope(BaseModel):
    """Metadata common to every command and event, around a typed payload."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: uuid.UUID = Field(
        description="Unique id, chosen by the sender; also the AMQP message_id. A command "
        "is acted on once per id and sender: send a repeat with the same id."
    )
    type: str = Field(description="Message type, e.g. `job.submit`; also the AMQP type.")
    version: int = Field(1, ge=1, description="Payload schema version of this type.")
    occurred_at: AwareDatetime = Field(
        default_factory=utcnow, description="When it happened or was asked (UTC)."
    )
    source: str = Field("unknown", max_length=256, description="`service@host` that produced it.")
    correlation_id: str | None = Field(
        None, max_length=256, description="The job id, where there is one."
    )
    causation_id: str | None = Field(
        None, max_length=256, description="Id of the message that caused this."
    )
    tenant: str | None = Field(
        None,
        max_length=64,
        description="Tenant the message concerns. From another system, ignored: the "
        "tenant its AMQP user acts for counts.",
    )
    actor: str | None = Field(None, max_length=256, description="User or system that acted.")
    payload: dict[str, Any] = Field(
        default_factory=dict, description="Type-specific body; see the catalog."
    )

    def caused(self, **fields: Any) -> dict[str, Any]:
        """Fields for a message caused by this one: same job, tenant and actor."""
        return {
            "correlation_id": self.correlation_id,
            "causation_id": str(self.id),
            "tenant": self.tenant,
            "actor": self.actor,
            **fields,
        }
