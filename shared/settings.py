"""Settings common to every service, read from `MEDHIVE_*` environment variables.

Each service has one settings class of its own (in its `settings.py`) that embeds these,
so the broker and database are configured once for a whole installation.
"""

from __future__ import annotations

import socket
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL


class AmqpSettings(BaseSettings):
    """Where RabbitMQ is and how this process talks to it."""

    model_config = SettingsConfigDict(env_prefix="MEDHIVE_AMQP_", extra="ignore")

    url: SecretStr = Field(
        SecretStr("amqp://medhive:medhive@127.0.0.1:5672/"),
        description="AMQP URL with the service account's credentials and vhost.",
    )
    nodes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="The other nodes of the broker's cluster, `host:port` and comma-separated: "
        "when the URL's node is lost, the connection moves to the next one (same "
        "credentials and vhost).",
    )
    prefetch: int = Field(64, ge=1, description="Unacknowledged deliveries per consumer.")
    delivery_limit: int = Field(
        5, ge=1, description="Redeliveries before a message is dead-lettered."
    )
    max_message_bytes: int = Field(
        1024 * 1024,
        ge=64 * 1024,
        description="Larger messages are refused by every consumer, with a reason and an "
        "audit record (the broker's own `max_message_size`, set by the setup, is higher).",
    )
    management_url: str | None = Field(
        None,
        description="RabbitMQ's management API, for `medhive amqp-user` and `medhive dead`; "
        "default: port 15672 on the AMQP host.",
    )

    @field_validator("nodes", mode="before")
    @classmethod
    def _split_nodes(cls, value: object) -> object:
        nodes = value.split(",") if isinstance(value, str) else value
        if not isinstance(nodes, list):
            return value
        nodes = [str(node).strip() for node in nodes if str(node).strip()]
        for node in nodes:
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{node!r} is not host:port")
        return nodes

    @property
    def urls(self) -> list[URL]:
        """The URL of every node to connect to, in the order to try them."""
        first = URL(self.url.get_secret_value())
        others = []
        for node in self.nodes:
            host, _, port = node.rpartition(":")
            others.append(first.with_host(host).with_port(int(port)))
        return [first, *others]

    @property
    def user(self) -> str:
        """The AMQP user of this process: the medhive service account by default."""
        return URL(self.url.get_secret_value()).user or "guest"

    def service_users(self, trusted_users: list[str] | None) -> frozenset[str]:
        """The AMQP users believed to be medhive's own services: a service's
        `trusted_users` setting, else the user of its own AMQP URL (the service
        account). The one place of this rule; every service's setting defers to it."""
        return frozenset(trusted_users or [self.user])

    @property
    def vhost(self) -> str:
        """The virtual host of the AMQP URL (`/` when it names none)."""
        path = URL(self.url.get_secret_value()).path
        return path[1:] if len(path) > 1 else "/"


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
