"""Settings common to every service, read from `MEDHIVE_*` environment variables.

Each service has one settings class of its own (in its `settings.py`) that embeds these,
so the broker and database are configured once for a whole installation.
"""

from __future__ import annotations

import socket

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL


class AmqpSettings(BaseSettings):
    """Where RabbitMQ is and how this process talks to it."""

    model_config = SettingsConfigDict(env_prefix="MEDHIVE_AMQP_", extra="ignore")

    url: SecretStr = Field(
        SecretStr("amqp://medhive:medhive@127.0.0.1:5672/"),
        description="AMQP URL with the service account's credentials and vhost.",
    )
    prefetch: int = Field(64, ge=1, description="Unacknowledged deliveries per consumer.")
    delivery_limit: int = Field(
        5, ge=1, description="Redeliveries before a message is dead-lettered."
    )

    @property
    def user(self) -> str:
        """The AMQP user of this process: the medhive service account by default."""
        return URL(self.url.get_secret_value()).user or "guest"


class MongoSettings(BaseSettings):
    """Where the MongoDB (or MongoDB-protocol) server is."""

    model_config = SettingsConfigDict(env_prefix="MEDHIVE_MONGO_", extra="ignore")

    url: SecretStr = Field(SecretStr("mongodb://127.0.0.1:27017/"), description="MongoDB URI.")
    identity_db: str = Field(
        "medhive_identity", description="Database of API tokens, shared by every HTTP API."
    )


def default_host() -> str:
    """The host name this process reports as part of its `source`."""
    return socket.gethostname()
