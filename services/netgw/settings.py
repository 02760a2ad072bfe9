"""Settings of the network gateway, from `MEDHIVE_NETGW_*` environment variables."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import AmqpSettings, MongoSettings


class NetgwSettings(BaseSettings):
    """The gateway's pools, its interfaces, and where its state lives."""

    model_config = SettingsConfigDict(env_prefix="MEDHIVE_NETGW_", extra="ignore")

    amqp: AmqpSettings = Field(default_factory=AmqpSettings, description="RabbitMQ.")
    mongo: MongoSettings = Field(default_factory=MongoSettings, description="MongoDB.")
    database: str = Field("medhive_netgw", description="Database of leases and forwards.")
    trusted_users: list[str] | None = Field(
        None,
        description="AMQP users (node agents) allowed to send net.* requests (default: the "
        "user of the AMQP URL, medhive's service account).",
    )
    host: str = Field("127.0.0.1", description="Address of the health and metrics endpoints.")
    port: int = Field(8084, ge=0, le=65535, description="Port of the health and metrics endpoints.")
    netns: str | None = Field(
        None,
        description="Network namespace (name under /run/netns) holding the gateway's "
        "interfaces; unset: the namespace netgw runs in.",
    )
    guest_interface: str = Field(
        "medhive0", description="Interface on the guests' network (dnsmasq serves DHCP there)."
    )
    guest_network: ipaddress.IPv4Interface = Field(
        ipaddress.IPv4Interface("10.77.0.1/24"),
        description="The gateway's address on the guests' network, with its prefix.",
    )
    ip_range: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] = Field(
        (ipaddress.IPv4Address("10.77.0.100"), ipaddress.IPv4Address("10.77.0.199")),
        description="First and last guest address handed out.",
    )
    mac_prefix: str = Field(
        "02:6d:68",
        pattern=r"^([0-9a-f]{2}:){2}[0-9a-f]{2}$",
        description="First three octets of guests' MACs (locally administered: 0x02 bit).",
    )
    external_address: ipaddress.IPv4Address = Field(
        ipaddress.IPv4Address("127.0.0.1"),
        description="The gateway's address users connect to (forwards listen there).",
    )
    external_ports: tuple[int, int] = Field(
        (40000, 40999), description="First and last external port handed out."
    )
    allow_egress: bool = Field(
        False, description="Let guests open connections out through the gateway (masqueraded)."
    )
    lease_grace_s: float = Field(
        600, ge=0, description="How long a lease outlives its job's walltime before it is swept."
    )
    sweep_s: float = Field(30, gt=0, description="Seconds between sweeps of expired leases.")
    state_dir: Path = Field(
        Path("/var/lib/medhive/netgw"), description="dnsmasq's hosts, lease and pid files."
    )
    dnsmasq: str = Field("dnsmasq", description="The dnsmasq binary.")
    probe_interval_s: float = Field(
        0.25, gt=0, description="Seconds between reachability checks of a booting guest."
    )

    @model_validator(mode="after")
    def _pools_fit(self) -> NetgwSettings:
        first, last = self.ip_range
        network = self.guest_network.network
        if first not in network or last not in network or last < first:
            raise ValueError(f"ip_range must lie in {network}, first <= last")
        if self.guest_network.ip in (first, last) or first <= self.guest_network.ip <= last:
            raise ValueError("the gateway's own address may not be in ip_range")
        if int(last) - int(first) >= 1 << 24:
            raise ValueError("ip_range is larger than the MAC pool")
        low, high = self.external_ports
        if not 1 <= low <= high <= 65535:
            raise ValueError("external_ports must be 1 <= first <= last <= 65535")
        if not int(self.mac_prefix[:2], 16) & 0x02:
            raise ValueError(
                "mac_prefix must be locally administered (bit 0x02 of the first octet)"
            )
        return self

    @property
    def pool_size(self) -> int:
        first, last = self.ip_range
        return int(last) - int(first) + 1
