"""The network gateway's requests and answers: leases, port forwards, releases.

`net.lease`, `net.forward` and `net.release` are requests: the node agent sends them
with an AMQP `reply_to`, and netgw answers with the event that records the outcome
(`net.leased`, `net.forwarded`, `net.released`, or `net.failed` with the reason),
published on the events exchange for audit and sent to `reply_to` as the reply. Every
request is idempotent per job attempt, so a node may repeat one after a timeout.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AwareDatetime, Field, StringConstraints

from shared.messages.base import Payload

PortName = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[a-z0-9-]+$")]
Port = Annotated[int, Field(ge=1, le=65535)]
Mac = Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")]


class NetLease(Payload):
    """Request `net.lease`: a MAC address with an IP bound to it by DHCP, for one attempt."""

    job_id: str = Field(description="The id of the VM's job.")
    attempt: int = Field(description="The attempt the lease is for, counted from 1.")
    node_id: str = Field(description="The node that runs the VM and asks.")
    expires_at: AwareDatetime = Field(description="The job's walltime end; released after it.")


class NetForward(Payload):
    """Request `net.forward`: forward a free external port to the guest's `port`.

    netgw first checks that the guest answers on its leased IP and `port`, for up to
    `wait_s`; a guest still booting gets `net.failed` with `retryable` set.
    """

    job_id: str = Field(description="The id of the VM's job.")
    attempt: int = Field(description="The attempt whose leased guest it is.")
    name: PortName = Field(description="The interactive port's name (rdp, ssh, ...).")
    port: Port = Field(description="The guest's TCP port.")
    wait_s: float = Field(
        10.0, ge=0, le=120, description="How long to wait for the guest to answer, in seconds."
    )


class NetRelease(Payload):
    """Request `net.release`: remove the attempt's forwards and free its lease."""

    job_id: str = Field(description="The id of the VM's job.")
    attempt: int = Field(description="The attempt whose lease and forwards to free.")
    reason: str = Field("the job ended", max_length=500, description="Why, in words.")


class NetLeased(Payload):
    """Event `net.leased`: the attempt holds this MAC and IP until `expires_at`."""

    job_id: str = Field(description="The id of the VM's job.")
    attempt: int = Field(description="The attempt that holds the lease.")
    mac: Mac = Field(description="The MAC address to give the guest's network interface.")
    ip: str = Field(description="The IPv4 address DHCP gives that MAC.")
    expires_at: AwareDatetime = Field(
        description="When the lease is released unless freed before: the job's walltime end "
        "plus netgw's grace period."
    )


class NetForwarded(Payload):
    """Event `net.forwarded`: `external` (host:port) now reaches `guest` (ip:port)."""

    job_id: str = Field(description="The id of the VM's job.")
    attempt: int = Field(description="The attempt whose guest it is.")
    name: PortName = Field(description="The interactive port's name (rdp, ssh, ...).")
    guest: str = Field(description="The guest's ip:port.")
    external: str = Field(description="The gateway's host:port that users connect to.")


class NetReleased(Payload):
    """Event `net.released`: the attempt's lease and forwards are gone."""

    job_id: str = Field(description="The id of the VM's job.")
    attempt: int = Field(description="The attempt whose lease it was.")
    mac: Mac | None = Field(None, description="The MAC freed; absent if the attempt held none.")
    ip: str | None = Field(None, description="The IP freed; absent if the attempt held none.")
    forwards: list[str] = Field(default_factory=list, description="External host:port freed.")
    reason: str = Field(
        description="Why: the request's reason, or `the lease expired with its job`."
    )


class NetFailed(Payload):
    """Event `net.failed`: a request could not be met, and why."""

    job_id: str = Field(description="The id of the VM's job.")
    attempt: int = Field(description="The attempt the request was for.")
    request: str = Field(description="The request's type.")
    reason: str = Field(description="Why it could not be met, in words.")
    retryable: bool = Field(description="True when asking again later may succeed.")
