"""Settings of the datacache, read from `MEDHIVE_DATACACHE_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.lease import LeaderSettings
from shared.settings import AmqpSettings, MongoSettings


class DatacacheSettings(LeaderSettings):
    """Where the cache lives, how big it may grow, its keys and its sources."""

    model_config = SettingsConfigDict(env_prefix="MEDHIVE_DATACACHE_", extra="ignore")

    amqp: AmqpSettings = Field(default_factory=AmqpSettings, description="RabbitMQ.")
    mongo: MongoSettings = Field(default_factory=MongoSettings, description="MongoDB.")
    database: str = Field("medhive_datacache", description="Database of the cache's catalog.")
    host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    port: int = Field(8082, ge=0, le=65535, description="Port the HTTP API listens on.")
    cache_dir: Path = Field(
        Path("/var/lib/medhive/datacache"), description="Encrypted objects live here."
    )
    budget_mb: int = Field(
        50 * 1024, ge=1, description="Size the cache may grow to before it evicts (LRU)."
    )
    object_ttl_s: int = Field(
        7 * 86400, ge=1, description="An object unused this long is evicted (unless pinned)."
    )
    eviction_interval_s: float = Field(60.0, gt=0, description="How often eviction runs.")
    master_key_file: Path | None = Field(
        None, description="File of master keys (`id:base64` lines, mode 0600)."
    )
    master_key: SecretStr | None = Field(
        None, description="Master keys in the same format, when not in a file."
    )
    sources_file: Path | None = Field(
        None,
        description="YAML or JSON list of sources each tenant may use, with credentials "
        "(see services/datacache/sources/base.py: SourceConfig).",
    )
    dimse_listen: str | None = Field(
        None,
        pattern=r"^[^:]*:[0-9]{1,5}$",
        description="`host:port` of the storage SCP that DIMSE C-MOVE retrievals arrive at "
        "(e.g. `0.0.0.0:11112`; the PACS must know the source's `calling_aet` at this "
        "address). Unset: no SCP, and sources retrieve with C-GET only.",
    )
    fetch_attempts: int = Field(5, ge=1, le=100, description="Tries per source before failing.")
    fetch_backoff_s: float = Field(0.5, gt=0, description="First wait between tries (doubles).")
    fetch_backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between tries.")
    fetch_timeout_s: float = Field(
        60.0, gt=0, description="Silence from a source after which a try is abandoned."
    )
    concurrent_fetches: int = Field(4, ge=1, description="Sources fetched at the same time.")
    progress_interval_s: float = Field(0.5, ge=0, description="Least time between progress events.")
    trusted_users: list[str] | None = Field(
        None,
        description="AMQP users allowed to send data commands (default: the user of the AMQP URL, "
        "medhive's service account).",
    )
