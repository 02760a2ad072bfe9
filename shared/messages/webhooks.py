"""Webhook delivery outcomes: what became of each try to send a tenant's webhook.

Published on the tenant's channel, so the audit records every outcome and the tenant's
own systems may follow them. None carries the endpoint's signing secret, nor its path
or query (a receiver may keep a credential of its own there): `target` is the origin.
"""

from __future__ import annotations

from pydantic import AwareDatetime, Field

from shared.messages.base import Payload


class WebhookAttempt(Payload):
    """What every outcome says of the try it reports."""

    delivery_id: str = Field(
        description="The delivery, sent as its `webhook-id` header: the same on every try "
        "of one message, so a receiver drops repeats by it."
    )
    webhook_id: str = Field(description="The registered webhook (`/v1/webhooks/{webhook_id}`).")
    event_type: str = Field(description="What was sent: a job event type, or `webhook.test`.")
    event_id: str | None = Field(
        None, description="The bus message the delivery announces (none for a test)."
    )
    job_id: str | None = Field(None, description="The job it is about, if any.")
    target: str = Field(description="Scheme, host and port the delivery was sent to.")
    attempt: int = Field(ge=1, description="Which try this was (1: the first).")
    status_code: int | None = Field(None, description="The receiver's HTTP status, if it answered.")
    error: str | None = Field(None, description="Why no answer came, if none came.")
    duration_ms: float = Field(ge=0, description="How long the try took, in milliseconds.")


class WebhookDelivered(WebhookAttempt):
    """Event `webhook.delivered`: the receiver answered 2xx; no more tries."""


class WebhookFailed(WebhookAttempt):
    """Event `webhook.failed`: a try failed (no 2xx answer); another one follows."""

    next_try_at: AwareDatetime = Field(description="When the next try starts, at the earliest.")


class WebhookGivenUp(WebhookAttempt):
    """Event `webhook.given_up`: a try failed and the next would come after the
    delivery's maximum age: no more tries."""

    queued_at: AwareDatetime = Field(description="When the delivery was queued.")
    reason: str = Field(description="Why there are no more tries.")
