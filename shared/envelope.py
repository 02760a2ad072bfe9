"""The one envelope every medhive message travels in (ARCHITECTURE.md, Messaging).

The envelope is deliberately loose about `payload` (a JSON object): each message type's
payload model lives in `shared.messages`, and the consumer boundary validates the
payload against the catalog entry for `type`, once.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the messages use."""
    return datetime.now(UTC)


class Envelope(BaseModel):
    """Metadata common to every command and event, around a typed payload."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: uuid.UUID = Field(
        default_factory=uuid.uuid4, description="Unique id; also the AMQP message_id."
    )
    type: str = Field(description="Message type, e.g. `job.submit`; also the AMQP type.")
    version: int = Field(1, ge=1, description="Payload schema version of this type.")
    occurred_at: AwareDatetime = Field(
        default_factory=utcnow, description="When it happened or was asked (UTC)."
    )
    source: str = Field("unknown", description="`service@host` that produced it.")
    correlation_id: str | None = Field(None, description="The job id, where there is one.")
    causation_id: str | None = Field(None, description="Id of the message that caused this.")
    tenant: str | None = Field(None, description="Tenant the message concerns.")
    actor: str | None = Field(None, description="User or system that acted.")
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
