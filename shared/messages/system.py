"""Events about the message system itself."""

from __future__ import annotations

from pydantic import Field

from shared.messages.base import Payload


class MessageRejected(Payload):
    """Event `message.rejected`: a message was dead-lettered instead of handled."""

    queue: str = Field(description="The queue whose consumer refused it.")
    reason: str = Field(description="Why it was refused.")
    message_id: str | None = Field(
        None, description="Its AMQP `message_id` property; absent if it had none."
    )
    message_type: str | None = Field(
        None, description="Its AMQP `type` property; absent if it had none."
    )
    routing_key: str | None = Field(None, description="The routing key it was published with.")
    user_id: str | None = Field(
        None, description="Its AMQP `user_id` property (the sender); absent if it had none."
    )
    body_excerpt: str = Field(
        "",
        description="The body's first 512 bytes as UTF-8 text (undecodable bytes replaced), "
        "for diagnosis.",
    )


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
