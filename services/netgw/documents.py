"""The documents netgw stores, in the shape `store.py` writes them: leases and forwards.

These are the stored shapes themselves, so mypy checks every read and write of a field.
They are `TypedDict`s rather than classes because a TypedDict is the very dict pymongo
hands back and takes in: nothing is converted on the way in or out (a lease and a
forward must stay within a few milliseconds), and the memory a `NetStore` keeps is the
documents it stored, compared by identity.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypedDict


class LeaseDoc(TypedDict):
    """A job attempt's lease of pool slot `slot`: that slot's MAC and IP (`leases`)."""

    _id: str  # `lease_id(job_id, attempt)`
    job_id: str
    attempt: int
    node_id: str
    tenant: str | None
    slot: int
    mac: str
    ip: str
    expires_at: datetime  # the job's walltime plus the grace period, to the millisecond
    created_at: datetime


class ForwardDoc(TypedDict):
    """An external port forwarded to a port of a leased guest (`forwards`)."""

    _id: str  # `forward_id(job_id, attempt, name)`, also the nftables rule's comment
    lease_id: str
    job_id: str
    attempt: int
    name: str
    external_port: int
    guest_ip: str
    guest_port: int
    expires_at: datetime  # its lease's
