"""Events about the message system itself."""

from __future__ import annotations

from pydantic import Field

from shared.messages.base import Payload


class MessageRejected(Payload):
    """Event `message.rejected`: a message was dead-lettered instead of handled."""

    queue: str
    reason: str
    message_id: str | None = None
    message_type: str | None = None
    routing_key: str | None = None
    user_id: str | None = None
    body_excerpt: str = Field("", description="The first bytes of the body, for diagnosis.")


class CommandRejected(Payload):
    """Event `command.rejected` (on `medhive.tenants`): a command sent by one of this
    tenant's systems was refused and dead-lettered.

    The sender's own side of `message.rejected`: why, and which message, without the
    body (operators see that in the audit), so nothing of one message reaches anyone
    who could not read it already.
    """

    reason: str = Field(description="Why the command was refused.")
    message_id: str | None = Field(None, description="The refused message's id.")
    message_type: str | None = Field(None, description="Its AMQP `type` property.")
    user_id: str | None = Field(None, description="The AMQP user that sent it.")
