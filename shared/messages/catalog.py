"""The catalog: every message type, its payload model and where it is published.

This is the one place a type name is spelled. Consumers validate payloads against it,
`medhive schema export` turns it into JSON Schema and AsyncAPI for other systems.

Three exchanges carry them. `medhive.commands` and `medhive.events` are the services'
own (and operators'); no integrator may read either. `medhive.tenants` carries what a
tenant's own systems may follow, with the tenant as the first word of the routing key
(`radiology.job.queued`), so that RabbitMQ's topic permissions confine each integrator
to its tenant's keys (README, "Following jobs over AMQP").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from shared.messages.base import Payload
from shared.messages.data import (
    DataAccessed,
    DataDenied,
    DataFailed,
    DataFetched,
    DataGrant,
    DataGranted,
    DataOutputs,
    DataProgress,
    DataQuarantined,
    DataRelease,
    DataReleased,
    DataStage,
    DataStaged,
    DataUploaded,
)
from shared.messages.jobs import (
    JobCancel,
    JobDuplicate,
    JobEvent,
    JobInteractive,
    JobState,
    JobSubmit,
    NodeCancel,
    NodeRun,
)
from shared.messages.net import (
    NetFailed,
    NetForward,
    NetForwarded,
    NetLease,
    NetLeased,
    NetRelease,
    NetReleased,
)
from shared.messages.nodes import NodeStatus, RunFinished, RunInteractive, RunOutput, RunStarted
from shared.messages.system import CommandRejected, MessageRejected
from shared.messages.webhooks import WebhookDelivered, WebhookFailed, WebhookGivenUp

COMMANDS: Final = "medhive.commands"
EVENTS: Final = "medhive.events"
TENANTS: Final = "medhive.tenants"
DEAD: Final = "medhive.dead"

#: The only commands other hospital systems may send (RabbitMQ's topic permissions
#: of their users allow exactly these routing keys on `medhive.commands`).
INTEGRATOR_COMMANDS: Final = ("job.submit", "job.cancel")


@dataclass(frozen=True)
class MessageType:
    """One catalog entry."""

    name: str
    model: type[Payload]
    exchange: Literal["medhive.commands", "medhive.events", "medhive.tenants"]
    summary: str
    routing_key: str = ""  # defaults to the name; `{node_id}` is filled in by the sender
    #: Whether a medhive service acts on it (its handler table takes it). False for
    #: what only the audit, tenants' own systems and operators read, and for replies,
    #: which go to the requester's reply queue.
    consumed: bool = True

    @property
    def key_pattern(self) -> str:
        """The routing key; on `medhive.tenants` it starts with the envelope's tenant."""
        if self.exchange == TENANTS:
            return "{tenant}." + self.name
        return self.routing_key or self.name

    @property
    def for_tenants(self) -> bool:
        """Whether a tenant's own systems receive it (on `medhive.tenants`)."""
        return self.exchange == TENANTS


_ENTRIES = [
    MessageType("job.submit", JobSubmit, COMMANDS, "Run a job for the sender's tenant."),
    MessageType("job.cancel", JobCancel, COMMANDS, "Cancel a job of the sender's tenant."),
    MessageType("node.run", NodeRun, COMMANDS, "Start one attempt of a job.", "node.{node_id}.run"),
    MessageType("node.cancel", NodeCancel, COMMANDS, "Stop one attempt.", "node.{node_id}.cancel"),
    *(
        MessageType(f"job.{state.value}", JobEvent, TENANTS, f"The job is now {state.value}.")
        for state in JobState
    ),
    MessageType(
        "job.interactive_ready", JobInteractive, TENANTS, "The guest answers; where to connect."
    ),
    MessageType(
        "job.duplicate",
        JobDuplicate,
        TENANTS,
        "A job.submit repeated an earlier one: its job.",
        consumed=False,
    ),
    MessageType(
        "command.rejected",
        CommandRejected,
        TENANTS,
        "A command of this tenant was refused.",
        consumed=False,
    ),
    MessageType(
        "webhook.delivered",
        WebhookDelivered,
        TENANTS,
        "A webhook's receiver accepted it (2xx).",
        consumed=False,
    ),
    MessageType(
        "webhook.failed",
        WebhookFailed,
        TENANTS,
        "A try of a webhook failed; another follows.",
        consumed=False,
    ),
    MessageType(
        "webhook.given_up",
        WebhookGivenUp,
        TENANTS,
        "A webhook failed until its maximum age.",
        consumed=False,
    ),
    MessageType("data.stage", DataStage, COMMANDS, "Stage a job's inputs in the datacache."),
    MessageType("data.grant", DataGrant, COMMANDS, "Let a node read a job's data."),
    MessageType("data.release", DataRelease, COMMANDS, "The job ended: revoke and unpin."),
    MessageType("data.progress", DataProgress, EVENTS, "Staging progress of a job."),
    MessageType(
        "data.fetched", DataFetched, EVENTS, "An input was fetched from its source.", consumed=False
    ),
    MessageType("data.staged", DataStaged, EVENTS, "Every input of a job is staged."),
    MessageType("data.failed", DataFailed, EVENTS, "Staging or granting failed."),
    MessageType("data.granted", DataGranted, EVENTS, "A node may read a job's data."),
    MessageType(
        "data.accessed", DataAccessed, EVENTS, "An object was read or written.", consumed=False
    ),
    MessageType("data.denied", DataDenied, EVENTS, "An access was refused.", consumed=False),
    MessageType(
        "data.quarantined", DataQuarantined, EVENTS, "An object failed its check.", consumed=False
    ),
    MessageType(
        "data.released", DataReleased, EVENTS, "A job's grants were revoked.", consumed=False
    ),
    MessageType("data.outputs", DataOutputs, EVENTS, "A job's results are stored."),
    MessageType("data.uploaded", DataUploaded, EVENTS, "Results sent to their destination."),
    MessageType("net.lease", NetLease, COMMANDS, "Lease a MAC and IP for a VM (request)."),
    MessageType("net.forward", NetForward, COMMANDS, "Forward a port to a VM (request)."),
    MessageType("net.release", NetRelease, COMMANDS, "Free a VM's lease and forwards (request)."),
    MessageType(
        "net.leased",
        NetLeased,
        EVENTS,
        "A MAC and IP are leased; reply to net.lease.",
        consumed=False,
    ),
    MessageType(
        "net.forwarded", NetForwarded, EVENTS, "A port is forwarded to a guest.", consumed=False
    ),
    MessageType(
        "net.released", NetReleased, EVENTS, "A lease and its forwards are freed.", consumed=False
    ),
    MessageType(
        "net.failed", NetFailed, EVENTS, "A network request could not be met.", consumed=False
    ),
    MessageType("node.online", NodeStatus, EVENTS, "A node agent started."),
    MessageType("node.heartbeat", NodeStatus, EVENTS, "A node agent is alive; its capacity."),
    MessageType("node.offline", NodeStatus, EVENTS, "A node agent stopped or was lost."),
    MessageType("run.started", RunStarted, EVENTS, "A workload started on a node."),
    MessageType("run.interactive", RunInteractive, EVENTS, "A guest's ports are forwarded."),
    MessageType("run.output", RunOutput, EVENTS, "Output a workload printed."),
    MessageType("run.finished", RunFinished, EVENTS, "A workload ended on a node."),
    MessageType(
        "message.rejected",
        MessageRejected,
        EVENTS,
        "A message was dead-lettered, with why.",
        consumed=False,
    ),
]

CATALOG: dict[str, MessageType] = {entry.name: entry for entry in _ENTRIES}


def job_event_type(state: JobState) -> str:
    """The event type announcing that a job entered `state`."""
    return f"job.{state.value}"
