"""Settings of the audit service, from `MEDHIVE_AUDIT_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import AmqpSettings, MongoSettings


class AuditSettings(BaseSettings):
    """Where the audit store lives, where its API listens, and how the recorder batches."""

    model_config = SettingsConfigDict(env_prefix="MEDHIVE_AUDIT_", extra="ignore")

    amqp: AmqpSettings = Field(
        default_factory=AmqpSettings, description="The broker (`MEDHIVE_AMQP_*`)."
    )
    mongo: MongoSettings = Field(
        default_factory=MongoSettings, description="The database server (`MEDHIVE_MONGO_*`)."
    )
    database: str = Field("medhive_audit", description="Database of the audit records.")
    host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    port: int = Field(8081, ge=1, le=65535, description="Port the HTTP API listens on.")
    batch_size: int = Field(
        256, ge=1, le=10_000, description="Most deliveries written to the store in one batch."
    )
    batch_wait_ms: int = Field(
        100,
        ge=0,
        le=10_000,
        description="How long a batch waits for more deliveries. Every batch is one "
        "stored block, and a block costs the database about the same whatever it holds: "
        "at a few jobs a second, 100 ms gathers the records of several jobs into one "
        "(20 ms stored most records alone: twice the audit's and the database's CPU per "
        "job). Nothing waits on the audit but its readers, who see a record that much later.",
    )
    trusted_users: list[str] | None = Field(
        None,
        description="medhive's service accounts, whose messages are filed under the tenant "
        "they name; default: the user of the AMQP URL. Other senders' messages are filed "
        "under the tenant their AMQP user acts for, or under none (operators only).",
    )
    streams_per_token: int = Field(
        4, ge=1, description="Live streams (`/v1/events/stream`) one token may hold open."
    )
    streams_total: int = Field(
        64, ge=1, description="Live streams open at once, all tokens together."
    )
