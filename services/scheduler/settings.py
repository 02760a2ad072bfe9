"""Scheduler settings, from `MEDHIVE_SCHEDULER_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.scheduler.egress import AllowedHost
from services.scheduler.webhooks import SealingKey
from shared.lease import LeaderSettings
from shared.settings import AmqpSettings, MongoSettings


class SchedulerSettings(LeaderSettings):
    model_config = SettingsConfigDict(env_prefix="MEDHIVE_SCHEDULER_", extra="ignore")

    amqp: AmqpSettings = Field(default_factory=AmqpSettings)
    mongo: MongoSettings = Field(default_factory=MongoSettings)
    database: str = Field("medhive_scheduler", description="The scheduler's own database.")
    host: str = Field("127.0.0.1", description="Address the job API listens on.")
    port: int = Field(8080, description="Port of the job API.")
    amqp_tenants: dict[str, str] = Field(
        default_factory=dict,
        description="AMQP users of other systems and their tenant, added at start to those "
        'that `medhive amqp-user add` keeps: {"ris": "radiology"}.',
    )
    trusted_users: list[str] | None = Field(
        None,
        description="AMQP users whose node reports are believed (default: the user of the "
        "AMQP URL, medhive's service account).",
    )
    node_timeout_s: float = Field(
        20.0, gt=0, description="A node silent this long is offline; its jobs are lost."
    )
    walltime_grace_s: float = Field(
        30.0, gt=0, description="After the deadline, how long the node has to stop a job."
    )
    watchdog_interval_s: float = Field(2.0, gt=0, description="How often deadlines are checked.")
    log_limit_bytes: int = Field(256 * 1024, description="Output kept per job and stream.")
    upload_grace_s: float = Field(
        600.0, gt=0, description="How long after its walltime a job's node may store results."
    )
    fair_share_half_life_s: float = Field(
        86400.0, gt=0, description="Half-life of a tenant's usage in fair share (README)."
    )
    memory_mb_per_cpu: int = Field(
        4096, gt=0, description="Memory that fair share counts as one cpu (README)."
    )
    webhook_allowed_hosts: list[AllowedHost] = Field(
        default_factory=list,
        description="Webhook receivers inside the site, exempt from the rule that a webhook "
        "goes over https:// to public addresses only: host names, addresses or networks "
        '(CIDR), e.g. ["hooks.lab.internal", "10.20.0.0/16"]; these may use http:// too.',
    )
    webhook_secret_key: SealingKey = Field(
        None,
        description="Base64 of 32 random bytes that seals webhooks' signing secrets in the "
        "database (unset: they are stored as they are).",
    )
    webhook_max_per_tenant: int = Field(20, ge=1, description="Webhooks one tenant may have.")
    webhook_timeout_s: float = Field(
        10.0, gt=0, description="How long a webhook's receiver has to answer one try."
    )
    webhook_first_retry_s: float = Field(
        5.0, gt=0, description="Wait after a webhook's first failed try; it doubles after each."
    )
    webhook_max_retry_s: float = Field(
        3600.0, gt=0, description="The longest wait between two tries of a webhook."
    )
    webhook_max_age_s: float = Field(
        86400.0,
        gt=0,
        description="A webhook not accepted this long after it was queued is given up.",
    )
    datacache_url: str = Field(
        "http://127.0.0.1:8082", description="The datacache's API, for downloads of results."
    )
    audit_url: str = Field(
        "http://127.0.0.1:8081",
        description="The audit's API, whose read routes the console reaches through this one.",
    )
