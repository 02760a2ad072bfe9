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
